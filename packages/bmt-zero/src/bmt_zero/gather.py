"""Full tensors of sharded parameters, for state dicts and checkpoints (not differentiable).

``gather_full`` works on any :class:`DistributedParameter`, inside a Block or not: it reads only
the contract both share, ``param.data`` = this rank's piece ``[_start_partition, _end_partition)``
of the flattened tensor, pieces in rank order over ``param._zero_comm``. ``gather_to(dst)`` makes
state-dict code keep full tensors on one rank only (``bmt.save``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

import bmt_comm
import torch
from bmt_comm import Communicator

from .parameter import DistributedParameter
from .partition import Partition

__all__ = ["gather_full", "gather_for_state", "gather_to", "state_dst", "keeps_state", "tp_chunk"]

# set by gather_to(): the global rank that keeps gathered state, None = every rank
_STATE_DST: ContextVar[int | None] = ContextVar("bmt_zero_state_dst", default=None)


@contextlib.contextmanager
def gather_to(dst: int | None) -> Iterator[None]:
    """Inside, ``gather_for_state`` (and so ``DistributedModule.state_dict``) keeps tensors on ``dst`` only."""
    token = _STATE_DST.set(dst)
    try:
        yield
    finally:
        _STATE_DST.reset(token)


def state_dst() -> int | None:
    """The global rank that keeps the state being collected inside ``gather_to(dst)``; None
    outside it (every rank keeps it)."""
    return _STATE_DST.get()


def keeps_state() -> bool:
    """Whether this rank keeps the state being collected (always, unless inside ``gather_to``)."""
    dst = _STATE_DST.get()
    return dst is None or bmt_comm.get_context().rank == dst


def _piece_ranges(param: DistributedParameter, comm: Communicator) -> list[tuple[int, int]]:
    """Every member's ``(start, end)``: arithmetic outside a Block, exchanged inside one."""
    numel = param._original_shape.numel()
    if not param._in_block:
        return [(p.start, p.end) for p in (Partition(numel, comm.size, r) for r in range(comm.size))]
    mine = torch.tensor([param._start_partition, param._end_partition], dtype=torch.int64, device=comm.device)
    everyone = torch.empty(2 * comm.size, dtype=torch.int64, device=comm.device)
    comm.all_gather(mine, everyone)
    flat = everyone.tolist()
    return [(flat[2 * r], flat[2 * r + 1]) for r in range(comm.size)]


def _check_cover(ranges: list[tuple[int, int]], numel: int, param: DistributedParameter) -> None:
    covered = 0
    for start, end in sorted(r for r in ranges if r[1] > r[0]):
        if start != covered:
            break
        covered = end
    if covered != numel or any(not 0 <= s <= e <= numel for s, e in ranges):
        raise RuntimeError(
            f"the pieces of a parameter of shape {tuple(param._original_shape)} must tile "
            f"[0, {numel}) without overlap; ranks hold {ranges}"
        )


def _local_piece(param: DistributedParameter) -> torch.Tensor:
    piece = param.detach().reshape(-1)
    expected = param._end_partition - param._start_partition
    if piece.numel() != expected:
        raise RuntimeError(
            f"a parameter of shape {tuple(param._original_shape)} holds {piece.numel()} elements but "
            f"its range [{param._start_partition}, {param._end_partition}) has {expected}; "
            "gather_full needs the sharded (released) state"
        )
    return piece


def gather_full(param: DistributedParameter, dst: int | None = None) -> torch.Tensor | None:
    """The full tensor (``_original_shape``, tp-local in ``tp_mode``), a new tensor, no autograd.

    Collective over ``param._zero_comm``. With ``dst`` (a global rank in that group) only ``dst``
    receives it, point to point, and the others return None: they never hold more than their piece.
    """
    comm = param._zero_comm
    shape = param._original_shape
    numel = shape.numel()
    piece = _local_piece(param)
    ranges = _piece_ranges(param, comm)
    _check_cover(ranges, numel, param)
    root: int | None = None
    if dst is not None:
        if dst not in comm.global_ranks:
            raise ValueError(f"dst rank {dst} is not in this parameter's group {list(comm.global_ranks)}")
        root = comm.global_ranks.index(dst)

    with torch.no_grad():
        if root is None:
            return _all_gather_pieces(piece, ranges, comm, numel).view(shape)
        if comm.rank != root:
            start, end = ranges[comm.rank]
            if end > start:
                with comm.group():
                    comm.send(piece.contiguous(), root)
            return None
        full = torch.empty(numel, dtype=piece.dtype, device=piece.device)
        start, end = ranges[root]
        full[start:end].copy_(piece)
        with comm.group():  # posted together: senders never wait on one another
            for r, (s, e) in enumerate(ranges):
                if r != root and e > s:
                    comm.recv(full[s:e], r)
        return full.view(shape)


def _all_gather_pieces(
    piece: torch.Tensor, ranges: list[tuple[int, int]], comm: Communicator, numel: int
) -> torch.Tensor:
    width = max(e - s for s, e in ranges)
    if width == 0:
        return torch.empty(numel, dtype=piece.dtype, device=piece.device)
    if piece.numel() == width:
        src = piece.contiguous()
    else:
        src = torch.zeros(width, dtype=piece.dtype, device=piece.device)
        src[: piece.numel()].copy_(piece)
    buf = torch.empty(width * comm.size, dtype=piece.dtype, device=piece.device)
    comm.all_gather(src, buf)
    if all(s == min(numel, r * width) and e == min(numel, (r + 1) * width) for r, (s, e) in enumerate(ranges)):
        return buf[:numel]  # the even padded split: pieces already sit in place
    full = torch.empty(numel, dtype=piece.dtype, device=piece.device)
    for r, (s, e) in enumerate(ranges):
        full[s:e].copy_(buf[r * width : r * width + (e - s)])
    return full


def tp_chunk(full: torch.Tensor, param: DistributedParameter, tp_rank: int | None = None) -> torch.Tensor:
    """The tensor-parallel rank's slice (along ``_tp_split_dim``) of a tp-full tensor."""
    if not param._tp_mode or param._tp_split_dim < 0:
        return full
    tp = bmt_comm.get_context().comms.tp
    dim = param._tp_split_dim
    size = param._original_shape[dim]
    rank = tp.rank if tp_rank is None else tp_rank
    return full.narrow(dim, rank * size, size)


def gather_for_state(param: DistributedParameter) -> torch.Tensor | None:
    """The model's whole logical tensor (zero gather, then the tp concatenation), detached.

    Inside ``gather_to(dst)`` only ``dst`` keeps it (the others get None). When ``dst`` is in the
    parameter's group the others never hold it; otherwise (tp-split parameters, groups without
    ``dst``) it is assembled everywhere and dropped where not kept.
    """
    ctx = bmt_comm.get_context()
    tp = ctx.comms.tp
    dst = state_dst()
    tp_split = param._tp_mode and tp.size > 1 and param._tp_split_dim >= 0
    if not tp_split and (dst is None or dst in param._zero_comm.global_ranks):
        return gather_full(param, dst)
    local = gather_full(param)
    assert local is not None
    if tp_split:
        stacked = torch.empty((tp.size, *local.shape), dtype=local.dtype, device=local.device)
        tp.all_gather(local.contiguous(), stacked)
        local = torch.cat(list(stacked.unbind(0)), dim=param._tp_split_dim)
    return local if keeps_state() else None
