"""``bmtrain.wrapper``: turn a plain torch model into a BMTrain one, in place."""

from __future__ import annotations

import torch
from bmt_ckpt import BMTrainModelWrapper

__all__ = ["BMTrainModelWrapper", "make_distributed", "model_wrapper_dispatch"]


def model_wrapper_dispatch(model: torch.nn.Module) -> torch.nn.Module:
    """1.0.1's dispatcher: TransformerBlockLists, DistributedModules and Blocks unchanged, any
    other module converted in place (:func:`BMTrainModelWrapper` does exactly this)."""
    return BMTrainModelWrapper(model)


def make_distributed(model: torch.nn.Module) -> torch.nn.Module:
    """Convert ``model`` in place (parameters to DistributedParameters, modules to
    ``Distributed<Name>`` subclasses, ``ModuleList`` children to chained Blocks) and return it.
    Unlike 1.0.1's, a TransformerBlockList, DistributedModule or Block passed here is returned as
    it is rather than converted again."""
    return BMTrainModelWrapper(model)
