"""``bmtrain.wrapper``: turn a plain torch model into a BMTrain one, in place."""

from __future__ import annotations

import torch
from bmt_ckpt import BMTrainModelWrapper as _wrap

from .hf.recording import adapt_output_recording

__all__ = ["BMTrainModelWrapper", "make_distributed", "model_wrapper_dispatch"]


def BMTrainModelWrapper(model: torch.nn.Module) -> torch.nn.Module:  # noqa: N802 - the reference's name
    """Return ``model`` converted in place: parameters become DistributedParameters (each rank
    keeps its shard), every child of a ``ModuleList`` becomes a ``Block`` (chained, so a loop over
    the list prefetches the next layer). TransformerBlockLists, DistributedModules and Blocks are
    returned unchanged. A transformers model keeps ``output_hidden_states``/``output_attentions``
    (its output recording is re-registered for the wrapped classes)."""
    out = _wrap(model)
    adapt_output_recording(out)
    return out


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
