"""``bmtrain.block_layer``: ZeRO-2/3 + activation checkpointing per block, and block lists.

``CheckpointBlock`` is the 1.0.1 name of ``Block``: the same class.
"""

from bmt_ckpt import Block, TransformerBlockList

CheckpointBlock = Block

__all__ = ["Block", "CheckpointBlock", "TransformerBlockList"]
