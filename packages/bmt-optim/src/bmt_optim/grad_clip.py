"""Global gradient norm over ZeRO shards, tensor-parallel slices and replicated parameters.

Which gradients are shards: a parameter that is a ``bmt_comm.Shard`` (bmt-zero's
``DistributedParameter`` and flat storage tensors, or a tensor marked with
``bmt_comm.mark_shard``) holds a slice of a tensor that no other rank holds, so its p-th power
sum is added over all ranks. Any other parameter is replicated on
every rank of its pipeline stage, so its sum is divided by the stage's size (the reference counts
it once per rank). The result is the same at any world size, and equals the norm that one
process holding the whole model computes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from bmt_comm import Communicator, ReduceOp, Shard, get_context, is_initialized

__all__ = ["clip_grads_", "global_grad_norm", "is_sharded", "parse_norm_type"]


def is_sharded(p: torch.Tensor) -> bool:
    """A ZeRO or tensor-parallel shard (its gradient is summed over ranks), see the module doc."""
    return isinstance(p, Shard)


def parse_norm_type(norm_type: float | str) -> float:
    p = float(norm_type)  # "inf" and math.inf both parse
    if not p > 0:
        raise ValueError(f"norm_type must be > 0 or 'inf', got {norm_type!r}")
    return p


def _grad(p: torch.Tensor) -> torch.Tensor | None:
    g = p.grad
    if g is not None and g.is_sparse:
        g = g.coalesce().values()
    return g


def _comm() -> Communicator | None:
    return get_context().comms.world if is_initialized() else None


def global_grad_norm(params: Iterable[torch.Tensor], norm_type: float | str = 2.0) -> torch.Tensor:
    """The p-norm of all gradients of ``params`` over every rank (collective when initialized).

    Returns an fp32 scalar tensor on the world communicator's device (or the gradients' device
    in a lone process). Parameters without a gradient count as zeros. Does not synchronise.
    """
    p = parse_norm_type(norm_type)
    comm = _comm()
    params = list(params)
    grads = [(g, is_sharded(q)) for q in params if (g := _grad(q)) is not None]
    if comm is not None:
        dev = comm.device
    else:
        dev = grads[0][0].device if grads else torch.device("cpu")
    sharded = torch.zeros((), dtype=torch.float32, device=dev)
    replicated = torch.zeros((), dtype=torch.float32, device=dev)
    for g, shard in grads:
        if g.numel() == 0:
            continue
        if math.isinf(p):
            part = torch.linalg.vector_norm(g, math.inf, dtype=torch.float32).to(dev)
        else:
            part = torch.linalg.vector_norm(g, p, dtype=torch.float32).to(dev) ** p
        if math.isinf(p):
            sharded = torch.maximum(sharded, part)  # max: a replica counted twice changes nothing
        elif shard:
            sharded = sharded + part
        else:
            replicated = replicated + part
    if math.isinf(p):
        total = sharded
        if comm is not None:
            comm.all_reduce(total.reshape(1), ReduceOp.MAX)
        return total
    if comm is not None:
        replicas = get_context().comms.pp_zero.size  # every rank of one pipeline stage
        total = (sharded + replicated / replicas).reshape(1)
        comm.all_reduce(total, ReduceOp.SUM)
        total = total[0]
    else:
        total = sharded + replicated
    return total ** (1.0 / p)


def clip_grads_(params: Iterable[torch.Tensor], coef: torch.Tensor) -> None:
    """Multiply every gradient by the scalar tensor ``coef`` in place (no synchronisation)."""
    grads: dict[torch.device, list[torch.Tensor]] = {}
    for q in params:
        if q.grad is not None:
            grads.setdefault(q.grad.device, []).append(q.grad)
    for dev, gs in grads.items():
        c = coef.to(dev)
        for g in gs:
            g.mul_(c)
