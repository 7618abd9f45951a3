"""bmt-ckpt: ``Block`` (``CheckpointBlock``) with ZeRO-2/3 and activation checkpointing, and
``TransformerBlockList`` with prefetched gathers and overlapped reduce-scatters."""

from .block import Block, BlockMode
from .block.options import SAVE_MATMUL_AND_ATTENTION
from .block_list import TransformerBlockList
from .pipeline import PipelineTransformerBlockList
from .wrapper import BMTrainModelWrapper

CheckpointBlock = Block

__all__ = [
    "BMTrainModelWrapper", "Block", "BlockMode", "CheckpointBlock", "PipelineTransformerBlockList",
    "SAVE_MATMUL_AND_ATTENTION", "TransformerBlockList",
]
