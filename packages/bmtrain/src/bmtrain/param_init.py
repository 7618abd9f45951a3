"""``bmtrain.param_init``: run each parameter's ``init_method``; list parameters by group."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from bmt_zero import DistributedParameter, grouped_parameters, init_parameters
from bmt_zero.init_params import init_distributed_parameter as _init_one

__all__ = ["init_parameters", "grouped_parameters", "init_distributed_parameter", "iterate_parameters"]


def init_distributed_parameter(params: Iterable[torch.nn.Parameter]) -> None:
    """Run ``init_method`` of each DistributedParameter in ``params`` that has one (1.0.1's
    helper); other parameters are skipped. Each rank keeps its shard of the full initial value."""
    for param in params:
        if isinstance(param, DistributedParameter):
            _init_one(param)


def iterate_parameters(model: torch.nn.Module) -> Iterator[torch.nn.Parameter | None]:
    """``model``'s own parameters (not its children's), as 1.0.1 lists them: nothing at all
    once one of them lives in a Block's storage, since the Block initialises those."""
    for param in model._parameters.values():
        if getattr(param, "_in_block", False):
            return
        yield param
