"""``Communicator`` over a torch.distributed process group (gloo on CPU; NCCL too, for interop)."""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import Callable, Iterator, Mapping
from types import MappingProxyType
from typing import Any

import torch
import torch.distributed as dist

from .communicator import Communicator, ReduceOp
from .timeouts import guard

__all__ = ["TorchCommunicator"]

_TORCH_OPS: Mapping[ReduceOp, dist.ReduceOp.RedOpType] = MappingProxyType({
    ReduceOp.SUM: dist.ReduceOp.SUM,
    ReduceOp.PROD: dist.ReduceOp.PRODUCT,
    ReduceOp.MAX: dist.ReduceOp.MAX,
    ReduceOp.MIN: dist.ReduceOp.MIN,
})

# dtypes gloo and torch's NCCL group both reduce natively (bool is reduced as uint8, see _as_reducible)
_REDUCIBLE = (
    torch.float64, torch.float32, torch.float16, torch.bfloat16,
    torch.int64, torch.int32, torch.int8, torch.uint8, torch.bool,
)

# torch 2.13 renamed the tensor-in/tensor-out collectives; 2.11 only has the old names.
_all_gather_single: Callable[..., object] = getattr(
    dist, "all_gather_single", dist.all_gather_into_tensor
)
_reduce_scatter_single: Callable[..., object] = getattr(
    dist, "reduce_scatter_single", dist.reduce_scatter_tensor
)


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A flat view that moves any dtype: gloo has no int16/uint16/complex/float8, bytes it has."""
    flat = t.view(-1)
    return flat if flat.dtype in _REDUCIBLE else flat.view(torch.uint8)


def _check_reducible(what: str, t: torch.Tensor) -> None:
    if t.dtype not in _REDUCIBLE:
        raise TypeError(
            f"{what} over torch.distributed supports dtypes {[str(d) for d in _REDUCIBLE]}, got {t.dtype}"
        )


def _bool_op(op: ReduceOp) -> ReduceOp:
    """bool reductions as uint8: sum/avg/max are a logical or, min/prod a logical and."""
    return ReduceOp.MAX if op in (ReduceOp.SUM, ReduceOp.MAX, ReduceOp.AVG) else ReduceOp.MIN


class TorchCommunicator(Communicator):
    """A group of ranks backed by a torch ProcessGroup.

    Calls are synchronous for gloo. Point-to-point calls made inside :meth:`group` are posted
    together at its end (``batch_isend_irecv``), so paired sends and receives cannot deadlock.
    ``process_group`` is None for a group of one, where every collective is a copy.
    """

    def __init__(
        self,
        process_group: dist.ProcessGroup | None,
        global_ranks: tuple[int, ...],
        rank: int,
        device: torch.device,
        owns_group: bool = False,
        timeout: datetime.timedelta | None = None,
        store: Any = None,
        label: str = "",
        generation: str = "",
    ) -> None:
        if not 0 <= rank < len(global_ranks):
            raise ValueError(f"rank ({rank}) must be in [0, {len(global_ranks)}) for ranks {global_ranks}")
        if process_group is None and len(global_ranks) > 1:
            raise ValueError(f"a group of {len(global_ranks)} ranks needs a process group")
        self._pg = process_group
        self._ranks = global_ranks
        self._rank = rank
        self._device = device
        self._owns_group = owns_group  # close() destroys the group only if we made it for this communicator
        self._pending_p2p: list[dist.P2POp] | None = None  # set inside group(): p2p ops wait to be posted
        self.timeout = timeout  # the group's own timeout (None: the caller's group, timeout unknown)
        self.label = label  # the group kinds it serves, for error messages
        self._store = store  # where a failing member looks up which members failed with it
        self._generation = generation  # the init's key space in the store
        self._seq = 0  # collectives run so far: the same count on every member, so a shared store key

    def guarded(self, op: str, collective: bool = True) -> contextlib.AbstractContextManager[None]:
        """A transport failure inside becomes a CollectiveError naming ``op`` and this group."""
        seq: int | None = None
        if collective:
            seq = self._seq
            self._seq += 1
        return guard(op, self._ranks, self._ranks[self._rank], self.timeout,
                     self._store if collective else None, seq, self.label, self._generation)

    @property
    def process_group(self) -> dist.ProcessGroup | None:
        return self._pg

    def close(self) -> None:
        """Destroy the group if this communicator owns it (never torch's default group)."""
        pg, self._pg = self._pg, None
        if (
            self._owns_group
            and pg is not None
            and pg is not dist.group.WORLD
            and dist.is_initialized()
        ):
            dist.destroy_process_group(pg)

    def _live_group(self) -> dist.ProcessGroup | None:
        if self._pg is None and self.size > 1:
            raise RuntimeError(f"{self!r} was closed (bmt_comm.destroy()); it can run no more collectives")
        return self._pg

    # --- helpers -----------------------------------------------------------------------
    # AVG is SUM then a division: gloo has no AVG, and none for integers (truncating, as NCCL's does)
    def _finish_avg(self, t: torch.Tensor) -> None:
        if t.is_floating_point():
            t.div_(self.size)
        else:
            t.copy_(torch.div(t, self.size, rounding_mode="trunc"))

    def _torch_op(self, op: ReduceOp) -> dist.ReduceOp.RedOpType:
        return _TORCH_OPS[ReduceOp.SUM if op is ReduceOp.AVG else op]

    # --- collectives -------------------------------------------------------------------
    def _all_gather(self, input: torch.Tensor, output: torch.Tensor) -> None:
        if self.size == 1:
            output.view(-1).copy_(input.view(-1))
            return
        with self.guarded("all_gather"):
            _all_gather_single(_as_bytes(output), _as_bytes(input), group=self._live_group())

    def _reduce_scatter(self, input: torch.Tensor, output: torch.Tensor, op: ReduceOp) -> None:
        _check_reducible(f"reduce_scatter({op.value})", input)
        out = output.view(-1)
        inp = input.view(-1)
        if self.size == 1:
            out.copy_(inp)
            return
        pg = self._live_group()
        if input.dtype == torch.bool:
            tmp = torch.empty_like(out, dtype=torch.uint8)
            with self.guarded("reduce_scatter"):
                _reduce_scatter_single(tmp, inp.to(torch.uint8), op=_TORCH_OPS[_bool_op(op)], group=pg)
            out.copy_(tmp.bool())
            return
        with self.guarded("reduce_scatter"):
            _reduce_scatter_single(out, inp, op=self._torch_op(op), group=pg)
        if op is ReduceOp.AVG:
            self._finish_avg(out)

    def _all_reduce(self, input: torch.Tensor, output: torch.Tensor, op: ReduceOp) -> None:
        _check_reducible(f"all_reduce({op.value})", input)
        if output.data_ptr() != input.data_ptr():
            output.copy_(input.view_as(output))
        if self.size == 1:
            return
        pg = self._live_group()
        if output.dtype == torch.bool:
            tmp = output.to(torch.uint8)
            with self.guarded("all_reduce"):
                dist.all_reduce(tmp, op=_TORCH_OPS[_bool_op(op)], group=pg)
            output.copy_(tmp.bool())
            return
        with self.guarded("all_reduce"):
            dist.all_reduce(output, op=self._torch_op(op), group=pg)
        if op is ReduceOp.AVG:
            self._finish_avg(output)

    def _broadcast(self, input: torch.Tensor, output: torch.Tensor, root: int) -> None:
        if self.rank == root and output.data_ptr() != input.data_ptr():
            output.copy_(input.view_as(output))
        if self.size == 1:
            return
        with self.guarded("broadcast"):
            dist.broadcast(_as_bytes(output), src=self._ranks[root], group=self._live_group())

    def _reduce(self, input: torch.Tensor, output: torch.Tensor, op: ReduceOp, root: int) -> None:
        _check_reducible(f"reduce({op.value})", input)
        in_place = output.data_ptr() == input.data_ptr()
        if not in_place:
            output.copy_(input.view_as(output))
        if self.size == 1:
            return
        pg = self._live_group()
        # torch's reduce clobbers its buffer on non-root ranks: keep an in-place input intact there
        work = input.clone() if in_place and self.rank != root else output
        if work.dtype == torch.bool:
            tmp = work.to(torch.uint8)
            with self.guarded("reduce"):
                dist.reduce(tmp, dst=self._ranks[root], op=_TORCH_OPS[_bool_op(op)], group=pg)
            work.copy_(tmp.bool())
            return
        with self.guarded("reduce"):
            dist.reduce(work, dst=self._ranks[root], op=self._torch_op(op), group=pg)
        if self.rank == root and op is ReduceOp.AVG:
            self._finish_avg(work)

    def _send(self, tensor: torch.Tensor, peer: int) -> None:
        self._p2p(dist.isend, tensor, peer)

    def _recv(self, tensor: torch.Tensor, peer: int) -> None:
        self._p2p(dist.irecv, tensor, peer)

    def _p2p(self, fn: Callable[..., object], tensor: torch.Tensor, peer: int) -> None:
        op = dist.P2POp(fn, _as_bytes(tensor), self._ranks[peer], group=self._live_group())
        if self._pending_p2p is not None:
            self._pending_p2p.append(op)
            return
        with self.guarded(f"{'send to' if fn is dist.isend else 'recv from'} rank {self._ranks[peer]}", collective=False):
            for work in dist.batch_isend_irecv([op]):
                work.wait()

    @contextlib.contextmanager
    def _group(self) -> Iterator[None]:
        if self._pending_p2p is not None:  # nested: the outermost group posts everything
            yield
            return
        self._pending_p2p = []
        try:
            yield
            ops = self._pending_p2p
        finally:
            self._pending_p2p = None
        if ops:
            with self.guarded(f"a group of {len(ops)} send/recv", collective=False):
                for work in dist.batch_isend_irecv(ops):
                    work.wait()
