"""``Communicator`` over a torch.distributed process group (gloo on CPU; NCCL too, for interop)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist

from .communicator import Communicator, ReduceOp

__all__ = ["TorchCommunicator"]

_TORCH_OPS = {
    ReduceOp.SUM: dist.ReduceOp.SUM,
    ReduceOp.PROD: dist.ReduceOp.PRODUCT,
    ReduceOp.MAX: dist.ReduceOp.MAX,
    ReduceOp.MIN: dist.ReduceOp.MIN,
}

# torch 2.13 renamed the tensor-in/tensor-out collectives; 2.11 only has the old names.
_all_gather_single: Callable[..., object] = getattr(
    dist, "all_gather_single", dist.all_gather_into_tensor
)
_reduce_scatter_single: Callable[..., object] = getattr(
    dist, "reduce_scatter_single", dist.reduce_scatter_tensor
)


class TorchCommunicator(Communicator):
    """A group of ranks backed by a torch ProcessGroup.

    Calls are synchronous for gloo. Point-to-point calls made inside :meth:`group` are posted
    together at its end (``batch_isend_irecv``), so paired sends and receives cannot deadlock.
    """

    def __init__(
        self,
        process_group: dist.ProcessGroup | None,
        global_ranks: tuple[int, ...],
        rank: int,
        device: torch.device,
    ) -> None:
        self._pg = process_group
        self._ranks = global_ranks
        self._rank = rank
        self._device = device
        self._pending_p2p: list[dist.P2POp] | None = None

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def size(self) -> int:
        return len(self._ranks)

    @property
    def global_ranks(self) -> tuple[int, ...]:
        return self._ranks

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def process_group(self) -> dist.ProcessGroup | None:
        return self._pg

    def close(self) -> None:
        """Destroy the sub-group this communicator created (never torch's default group)."""
        if self._pg is not None and self._pg is not dist.group.WORLD and dist.is_initialized():
            dist.destroy_process_group(self._pg)
        self._pg = None

    # --- helpers -----------------------------------------------------------------------
    # AVG is SUM then a division: gloo has no AVG for integers (truncating, as NCCL's does)
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
        _all_gather_single(output.view(-1), input.view(-1), group=self._pg)

    def _reduce_scatter(self, input: torch.Tensor, output: torch.Tensor, op: ReduceOp) -> None:
        if self.size == 1:
            output.view(-1).copy_(input.view(-1))
            return
        out = output.view(-1)
        inp = input.view(-1)
        if input.dtype == torch.bool:
            # gloo has no bool reduction; reduce as uint8 (sum/max -> or, min/prod -> and)
            tmp = torch.empty_like(out, dtype=torch.uint8)
            bool_op = ReduceOp.MAX if op in (ReduceOp.SUM, ReduceOp.MAX, ReduceOp.AVG) else ReduceOp.MIN
            _reduce_scatter_single(tmp, inp.to(torch.uint8), op=_TORCH_OPS[bool_op], group=self._pg)
            out.copy_(tmp.bool())
            return
        _reduce_scatter_single(out, inp, op=self._torch_op(op), group=self._pg)
        if op is ReduceOp.AVG:
            self._finish_avg(out)

    def _all_reduce(self, input: torch.Tensor, output: torch.Tensor, op: ReduceOp) -> None:
        if output.data_ptr() != input.data_ptr():
            output.copy_(input.view_as(output))
        if self.size == 1:
            return
        if output.dtype == torch.bool:
            tmp = output.to(torch.uint8)
            bool_op = ReduceOp.MAX if op in (ReduceOp.SUM, ReduceOp.MAX, ReduceOp.AVG) else ReduceOp.MIN
            dist.all_reduce(tmp, op=_TORCH_OPS[bool_op], group=self._pg)
            output.copy_(tmp.bool())
            return
        dist.all_reduce(output, op=self._torch_op(op), group=self._pg)
        if op is ReduceOp.AVG:
            self._finish_avg(output)

    def _broadcast(self, input: torch.Tensor, output: torch.Tensor, root: int) -> None:
        if self.rank == root and output.data_ptr() != input.data_ptr():
            output.copy_(input.view_as(output))
        if self.size == 1:
            return
        dist.broadcast(output, src=self._ranks[root], group=self._pg)

    def _reduce(self, input: torch.Tensor, output: torch.Tensor, op: ReduceOp, root: int) -> None:
        # torch's reduce clobbers the input on non-root ranks; work on a scratch copy there
        work = output if output.data_ptr() != input.data_ptr() else input
        if work is not input:
            work.copy_(input.view_as(work))
        if self.size == 1:
            return
        if self.rank != root and work is input:
            work = input.clone()
        dist.reduce(work, dst=self._ranks[root], op=self._torch_op(op), group=self._pg)
        if self.rank == root and op is ReduceOp.AVG:
            self._finish_avg(work)

    def _send(self, tensor: torch.Tensor, peer: int) -> None:
        self._p2p(dist.isend, tensor, peer)

    def _recv(self, tensor: torch.Tensor, peer: int) -> None:
        self._p2p(dist.irecv, tensor, peer)

    def _p2p(self, fn: Callable[..., object], tensor: torch.Tensor, peer: int) -> None:
        op = dist.P2POp(fn, tensor, self._ranks[peer], group=self._pg)
        if self._pending_p2p is not None:
            self._pending_p2p.append(op)
            return
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
            for work in dist.batch_isend_irecv(ops):
                work.wait()
