"""Plain parameters of a DistributedModule (outside any Block) are replicated: every rank holds
the whole tensor. Their gradients are summed over the zero group, as a DistributedParameter's
are reduce-scattered, so every rank steps the same value and the copies never drift apart.

BMTrain 1.0.1 left these gradients local: after one optimizer step each rank's copy differed
(a porting note in README). The sum is a tensor hook, applied before autograd accumulates into
``.grad``, so gradient accumulation over micro-batches adds sums of sums correctly.
"""

from __future__ import annotations

import bmt_comm
import torch
from bmt_comm import ReduceOp

from .parameter import DistributedParameter

__all__ = ["sync_replicated_grads"]

_SYNCED = "_bmt_replicated_grad_sync"  # set on a parameter once its hook is registered


def _summed(grad: torch.Tensor) -> torch.Tensor:
    comm = bmt_comm.get_context().comms.zero  # looked up per call: a re-init makes new groups
    if comm.size == 1:
        return grad
    out = grad.contiguous().clone()  # autograd may reuse the incoming buffer: reduce a copy
    comm.all_reduce(out, ReduceOp.SUM)
    return out


def sync_replicated_grads(root: torch.nn.Module) -> None:
    """Hook each plain parameter under ``root`` that needs a gradient and is not hooked yet: its
    gradient is summed over the zero group. Blocks' subtrees hold only DistributedParameters and
    are not walked, so a call costs a look at the few modules outside Blocks; it runs at each
    outermost DistributedModule call, which also catches parameters added or unfrozen later."""
    from .module import is_block  # noqa: PLC0415 - module imports this file

    if not bmt_comm.is_initialized() or bmt_comm.get_context().comms.zero.size == 1:
        return
    stack = [root]
    while stack:
        module = stack.pop()
        for param in module._parameters.values():
            if (
                param is None
                or isinstance(param, DistributedParameter)
                or not param.requires_grad
                or getattr(param, _SYNCED, False)
            ):
                continue
            param.register_hook(_summed)  # type: ignore[no-untyped-call]
            setattr(param, _SYNCED, True)
        stack.extend(child for child in module._modules.values() if child is not None and not is_block(child))
