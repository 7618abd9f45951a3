"""BMTrain 1.0.1's ``bmtrain.optim.optim_manager``: the manager and its two helper functions."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import bmt_comm
import torch
from bmt_optim import OptimManager
from bmt_optim.loss.functional import has_inf_nan

__all__ = ["OptimManager", "check_overflow", "grad_rescale"]


def check_overflow(param_groups: Iterable[Mapping[str, Any]]) -> None:
    """Raise ``OverflowError("Gradient overflow")`` if a non-fp32 gradient of any rank holds an inf
    or a nan (1.0.1's check: fp32 gradients are not looked at). Collective over the world once
    ``init_distributed`` ran; every rank must call it."""
    groups = list(param_groups)
    grads = [p.grad for g in groups for p in g["params"] if p.grad is not None and p.dtype != torch.float32]
    initialized = bmt_comm.is_initialized()
    if initialized:
        device = bmt_comm.get_context().device
    else:
        device = grads[0].device if grads else torch.device("cpu")
    flag = torch.zeros(1, dtype=torch.uint8, device=device)
    for g in grads:
        if g.device == flag.device:
            has_inf_nan(g, flag)
        else:  # a gradient elsewhere (e.g. offloaded): check it where it is
            local = torch.zeros(1, dtype=torch.uint8, device=g.device)
            has_inf_nan(g, local)
            flag.bitwise_or_(local.to(flag.device))
    if initialized:
        bmt_comm.get_context().comms.world.all_reduce(flag, bmt_comm.ReduceOp.MAX)
    if flag.item() > 0:
        raise OverflowError("Gradient overflow")


def grad_rescale(param_groups: Iterable[Mapping[str, Any]], scale: float) -> None:
    """Divide, in place, the gradient of every parameter that requires one by ``scale``."""
    for group in param_groups:
        for p in group["params"]:
            if p.grad is not None and p.requires_grad:
                p.grad /= scale
