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

__all__ = [
    "clip_grads_",
    "global_grad_norm",
    "grad_norm_parts",
    "is_sharded",
    "norm_device",
    "parse_norm_type",
    "reduce_norm_parts",
]


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
    sharded, replicated = grad_norm_parts(params, p)
    return reduce_norm_parts(sharded, replicated, p)


def norm_device(params: Iterable[torch.Tensor]) -> torch.device:
    """Where a norm of these gradients is reduced: the world communicator's device, or the first
    gradient's in a lone process."""
    comm = _comm()
    if comm is not None:
        return comm.device
    return next((g.device for q in params if (g := _grad(q)) is not None), torch.device("cpu"))


def grad_norm_parts(
    params: Iterable[torch.Tensor], p: float, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of the p-norm of the gradients of ``params``: (sum over shards,
    sum over replicated parameters) of ``|g|^p`` (for p = inf: the max, in the first, and a zero),
    fp32 scalars on ``device`` (default: ``norm_device``). ``reduce_norm_parts`` finishes it."""
    params = list(params)
    dev = device if device is not None else norm_device(params)
    grads = [(g, is_sharded(q)) for q in params if (g := _grad(q)) is not None]
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
    return sharded, replicated


def reduce_norm_parts(sharded: torch.Tensor, replicated: torch.Tensor, p: float) -> torch.Tensor:
    """The global p-norm from every rank's ``grad_norm_parts`` (collective when initialized)."""
    comm = _comm()
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
