"""Statistics of a model's parameters and gradients, whole-tensor, without gathering any tensor.

Each rank holds disjoint pieces of a sharded parameter (its ZeRO shard, or its slice of a
Block's flat storage), so exact statistics of the full tensor pool from per-rank moments over
*that parameter's* communicator (the Block storage's for a parameter in a Block); a tensor-parallel split parameter is pooled over the
tensor-parallel group as well. Plain parameters are replicated: their local tensor is whole.
"""

from __future__ import annotations

import fnmatch
from typing import Any

import bmt_comm
import torch
from bmt_comm import Communicator
from bmt_zero import DistributedParameter

from ._stats import ROW, gather_rows, local_row, pool_rows, to_moments

__all__ = ["inspect_model"]


def _param_comm(p: DistributedParameter) -> Communicator:
    """The group over which ``p``'s elements are spread (a Block re-homes it to its storage's)."""
    comm: Communicator = p.shard_comm
    return comm


def _pool_by_comm(rows: torch.Tensor, comms: list[Communicator | None]) -> torch.Tensor:
    """Pool row ``i`` over ``comms[i]`` (as is when None); one all-gather per communicator.

    Every rank walks the parameters in the same order, so the communicators come up in the
    same order on every member and the collectives line up.
    """
    out = rows.clone()
    order: dict[int, tuple[Communicator, list[int]]] = {}
    for i, comm in enumerate(comms):
        if comm is not None and comm.size > 1:
            order.setdefault(id(comm), (comm, []))[1].append(i)
    for comm, idx in order.values():
        gathered = gather_rows(rows[idx], comm)  # (n, k, pieces*ROW)
        stacked = gathered.view(comm.size, len(idx), -1, ROW).permute(1, 2, 0, 3)  # (k, pieces, n, ROW)
        out[idx] = pool_rows(stacked).reshape(len(idx), -1)
    return out


def inspect_model(model: torch.nn.Module, param_name: str, prefix: str = "") -> list[dict[str, Any]]:
    """Statistics of each parameter whose dotted name (after ``prefix``) matches ``param_name``.

    ``param_name`` is an ``fnmatch`` pattern (``"*"``, ``"*.linear*"``). Collective: every rank
    must call it with the same model. Keys: ``name, shape, std, mean, max, min, grad_std,
    grad_mean`` (gradient statistics are 0.0 for a parameter without a gradient on any rank).
    """
    picked: list[tuple[str, torch.nn.Parameter]] = [
        (prefix + name, p) for name, p in model.named_parameters() if fnmatch.fnmatch(prefix + name, param_name)
    ]
    if not picked:
        return []
    with torch.no_grad():
        rows = torch.stack(
            # a parameter's data and gradient are this rank's elements (an empty piece counts 0)
            [torch.cat([local_row(p.data).cpu(), local_row(p.grad).cpu()])
             for _, p in picked]
        )  # (P, 2*ROW)
        zero_comms: list[Communicator | None] = [
            _param_comm(p) if isinstance(p, DistributedParameter) else None for _, p in picked
        ]
        rows = _pool_by_comm(rows, zero_comms)
        tp = bmt_comm.get_context().comms.tp if bmt_comm.is_initialized() else None
        tp_comms: list[Communicator | None] = [
            tp if isinstance(p, DistributedParameter) and p.tp_mode and p.tp_split_dim >= 0 else None
            for _, p in picked
        ]
        rows = _pool_by_comm(rows, tp_comms)

    result = []
    for (name, p), row in zip(picked, rows, strict=True):
        v, g = to_moments(row[:ROW]), to_moments(row[ROW:])
        if isinstance(p, DistributedParameter):
            shape = tuple(p.tp_original_shape if p.tp_mode else p.original_shape)
        else:
            shape = tuple(p.shape)
        result.append(
            {
                "name": name,
                "shape": shape,
                "std": v.std,
                "mean": v.mean,
                "max": v.max,
                "min": v.min,
                "grad_std": g.std if g.count else 0.0,
                "grad_mean": g.mean if g.count else 0.0,
            }
        )
    return result
