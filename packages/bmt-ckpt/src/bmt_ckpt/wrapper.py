"""``BMTrainModelWrapper``: make a plain torch model a BMTrain one, in place."""

from __future__ import annotations

import torch
from bmt_zero import DistributedModule, make_distributed

from .block import Block
from .block_list import TransformerBlockList, chain_blocks

__all__ = ["BMTrainModelWrapper"]


def BMTrainModelWrapper(model: torch.nn.Module) -> torch.nn.Module:  # noqa: N802 - the reference's name
    """Return ``model`` converted in place: parameters become DistributedParameters (each rank
    keeps its shard), every child of a ``ModuleList`` becomes a ``Block`` (chained, so a loop over
    the list prefetches the next layer). TransformerBlockLists, DistributedModules and Blocks are
    returned unchanged."""
    if isinstance(model, (TransformerBlockList, DistributedModule, Block)):
        return model
    make_distributed(model)
    for module in list(model.modules()):
        if isinstance(module, torch.nn.ModuleList) and not isinstance(module, TransformerBlockList):
            blocks = [child if isinstance(child, Block) else Block(child) for child in module]
            for i, block in enumerate(blocks):
                module[i] = block
            chain_blocks(blocks)
    return model
