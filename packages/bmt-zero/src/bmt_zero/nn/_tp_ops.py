"""Communication steps and autograd functions of the tensor-parallel layers.

Activations are sharded along dim 0 over the tensor-parallel group (sequence-parallel style):
rank ``r`` of ``tp`` holds rows ``[r*n, (r+1)*n)`` of an ``(N = tp*n, ..., features)`` tensor.
Every step is the identity on a group of one, so the layers degenerate to plain ops at tp 1.
On CUDA the collectives that can overlap a matmul run on ``streams.tp_comm``; on CPU the stream
helpers are no-ops and the same code runs in order.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

import bmt_comm
import torch
import torch.nn.functional as F
from bmt_comm import Communicator

__all__ = [
    "ReduceType",
    "OpParallelLinear",
    "LinearPlan",
    "tp_comm",
    "gather_rows",
    "gather_last",
    "split_last",
    "reduce_scatter_rows",
    "all_reduce_sum",
    "vocab_parallel_embedding",
]

Stream = Any  # torch.cuda.Stream | None; typed loosely so CPU-only installs need no CUDA types
Event = Any  # torch.cuda.Event | None


class ReduceType(Enum):
    """How ``OpParallelLinear`` combines the partial outputs of a row-parallel matmul."""

    ALL_REDUCE = 1  # every tp rank gets the whole summed output
    REDUCE_SCATTER = 2  # rank r gets its dim-0 block of the summed output

    @classmethod
    def parse(cls, value: ReduceType | int | None) -> ReduceType | None:
        if value is None or isinstance(value, ReduceType):
            return value
        try:
            return cls(value)
        except ValueError:
            raise ValueError(
                f"reduce_output_type must be None, ReduceType or one of {[t.value for t in cls]}, got {value!r}"
            ) from None


def tp_comm() -> Communicator:
    return bmt_comm.get_context().comms.tp


# --- plain (non-differentiable) steps -----------------------------------------------------
def gather_stacked(x: torch.Tensor, comm: Communicator) -> torch.Tensor:
    """Every rank's ``x`` stacked: ``(size, *x.shape)``."""
    src = x.contiguous()
    out = torch.empty((comm.size, *x.shape), dtype=x.dtype, device=x.device)
    comm.all_gather(src, out)
    return out


def gather_rows(x: torch.Tensor, comm: Communicator) -> torch.Tensor:
    """All-gather on dim 0: ``(n, ...) -> (size*n, ...)``, rank-major."""
    if comm.size == 1:
        return x
    return gather_stacked(x, comm).flatten(0, 1)


def _cat_last(stacked: torch.Tensor) -> torch.Tensor:
    """``(size, ..., f) -> (..., size*f)``: the ranks' slices side by side on the last dim."""
    return stacked.movedim(0, -2).flatten(-2)


def gather_last(x: torch.Tensor, comm: Communicator) -> torch.Tensor:
    """All-gather and concatenate on the last dim: ``(..., f) -> (..., size*f)``."""
    if comm.size == 1:
        return x
    return _cat_last(gather_stacked(x, comm))


def split_last(x: torch.Tensor, comm: Communicator) -> torch.Tensor:
    """This rank's slice of the last dim (a view)."""
    if comm.size == 1:
        return x
    f = x.shape[-1]
    if f % comm.size != 0:
        raise ValueError(f"the last dim ({f}) must be divisible by tp_size ({comm.size}) to split it")
    step = f // comm.size
    return x.narrow(-1, comm.rank * step, step)


def _check_rows(x: torch.Tensor, comm: Communicator, what: str) -> int:
    if x.dim() == 0 or x.shape[0] % comm.size != 0:
        rows = x.shape[0] if x.dim() else "a scalar"
        raise ValueError(f"{what}: dim 0 ({rows}) must be divisible by tp_size ({comm.size})")
    return x.shape[0] // comm.size


def reduce_scatter_rows(x: torch.Tensor, comm: Communicator) -> torch.Tensor:
    """Sum over ranks and keep this rank's dim-0 block: ``(size*n, ...) -> (n, ...)``."""
    if comm.size == 1:
        return x
    n = _check_rows(x, comm, "reduce-scatter of the output")
    out = torch.empty((n, *x.shape[1:]), dtype=x.dtype, device=x.device)
    comm.reduce_scatter(x.contiguous(), out, bmt_comm.ReduceOp.SUM)
    return out


def all_reduce_sum(x: torch.Tensor, comm: Communicator) -> torch.Tensor:
    if comm.size == 1:
        return x
    out = x.contiguous()
    if out is x:  # never reduce into a tensor autograd may still need
        out = x.clone()
    comm.all_reduce(out, bmt_comm.ReduceOp.SUM)
    return out


def _record_event(stream: Stream) -> Event:
    if stream is None:
        return None
    event = torch.cuda.Event()  # type: ignore[no-untyped-call]
    event.record(stream)
    return event


def _wait_event(stream: Stream, event: Event) -> None:
    if stream is not None and event is not None:
        stream.wait_event(event)


# --- OpParallelLinear ----------------------------------------------------------------------
@dataclass(frozen=True)
class LinearPlan:
    """What ``OpParallelLinear`` does around its matmul (the forward; backward is the dual)."""

    gather_input: bool  # all-gather the input on dim 0 first
    gather_output: bool  # concatenate the ranks' outputs on the last dim
    split_input: bool  # keep only this rank's slice of the input's last dim
    reduce: ReduceType | None  # sum the ranks' partial outputs
    chunks: int  # rounds of the input gather / output reduce-scatter, to overlap with matmuls

    def __post_init__(self) -> None:
        if self.gather_output and self.reduce is not None:
            raise ValueError(
                f"gather_output=True cannot be combined with reduce_output_type={self.reduce}: "
                f"a column-parallel output is concatenated, a row-parallel one is summed"
            )
        if not isinstance(self.chunks, int) or self.chunks < 1:
            raise ValueError(f"async_gather_chunks must be an int >= 1, got {self.chunks!r}")


def _streams(device: torch.device) -> tuple[Stream, Stream]:
    """(the compute stream, the tp communication stream); both None on CPU."""
    return bmt_comm.current_stream(device), bmt_comm.get_context().streams.tp_comm


def _prepare_input(x: torch.Tensor, plan: LinearPlan, comm: Communicator) -> torch.Tensor:
    a = gather_rows(x, comm) if plan.gather_input else x
    return split_last(a, comm) if plan.split_input else a


def _gather_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, plan: LinearPlan, comm: Communicator
) -> torch.Tensor:
    """``F.linear(gather_rows(x))`` in rounds: round i+1's all-gather overlaps round i's matmul."""
    _check_not_scalar(x)
    cur, side = _streams(x.device)
    pieces = [p.contiguous() for p in x.chunk(plan.chunks, dim=0)]
    bmt_comm.wait_stream(side, cur)  # the input is written on the compute stream
    gathered: list[tuple[torch.Tensor, Event]] = []
    with bmt_comm.stream_context(side):
        for p in pieces:
            bmt_comm.record_stream(p, side)
            gathered.append((gather_stacked(p, comm), _record_event(side)))
    outs = []
    for g, event in gathered:
        _wait_event(cur, event)
        bmt_comm.record_stream(g, cur)
        a = split_last(g, comm) if plan.split_input else g
        outs.append(F.linear(a, weight, bias))  # (size, n_i, ..., out)
    return torch.cat(outs, dim=1).flatten(0, 1)


def _check_not_scalar(x: torch.Tensor) -> None:
    if x.dim() < 1:
        raise ValueError("a tensor-parallel linear needs an input with at least one dim, got a scalar")


def _linear_reduce_scatter(
    a: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, plan: LinearPlan, comm: Communicator
) -> torch.Tensor:
    """``reduce_scatter_rows(F.linear(a))`` in rounds: round i's reduce-scatter overlaps round i+1's matmul."""
    if comm.size == 1:
        return F.linear(a, weight, bias)
    n = _check_rows(a, comm, "reduce-scatter of the output")
    cur, side = _streams(a.device)
    blocks = a.view(comm.size, n, *a.shape[1:])  # rank r's output rows are block r
    outs = []
    for p in blocks.chunk(plan.chunks, dim=1):
        y = F.linear(p, weight, bias).contiguous()  # (size, n_i, ..., out)
        out = torch.empty(y.shape[1:], dtype=y.dtype, device=y.device)
        bmt_comm.wait_stream(side, cur)  # y is written on the compute stream
        with bmt_comm.stream_context(side):
            bmt_comm.record_stream(y, side)
            bmt_comm.record_stream(out, side)
            comm.reduce_scatter(y, out, bmt_comm.ReduceOp.SUM)
        outs.append(out)
    bmt_comm.wait_stream(cur, side)
    return torch.cat(outs, dim=0)


def _input_grad(ga: torch.Tensor, plan: LinearPlan, comm: Communicator) -> torch.Tensor:
    """Map the gradient of the matmul's input back to the gradient of the op's input."""
    if comm.size == 1:
        return ga
    if plan.split_input:
        # each rank computed its slice of the last dim of the same (replicated) tensor
        stacked = gather_stacked(ga, comm)  # (size, N, ..., f)
        if plan.gather_input:
            n = _check_rows(ga, comm, "input gradient")
            # this rank's rows only
            stacked = stacked.view(comm.size, comm.size, n, *stacked.shape[2:])[:, comm.rank]
        return _cat_last(stacked)
    if plan.gather_input:
        return reduce_scatter_rows(ga, comm)  # every rank used every rank's rows
    if plan.reduce is None:
        return all_reduce_sum(ga, comm)  # a replicated input fed every rank's output slice
    return ga  # a rank-local input (row-parallel): its gradient is complete here


class OpParallelLinear(torch.autograd.Function):
    """``F.linear`` with the tensor-parallel communication around it (see ``LinearPlan``).

    ``apply(input, weight, bias=None, gather_input=False, gather_output=False, split_input=False,
    reduce_output_type=None, async_gather_chunks=2)``. ``gather_input`` all-gathers the input on
    dim 0 (in ``async_gather_chunks`` rounds overlapped with the matmul); ``split_input`` keeps
    this rank's slice of the (gathered) input's last dim; ``gather_output`` concatenates the
    outputs on the last dim; ``reduce_output_type`` sums them (all-reduce, or reduce-scatter on
    dim 0 overlapped with the matmul). A bias is added before any reduction. The gathered input
    is not kept: backward gathers it again, overlapped with the input-gradient matmul.
    """

    @staticmethod
    def forward(
        ctx: Any,
        input: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        gather_input: bool = False,
        gather_output: bool = False,
        split_input: bool = False,
        reduce_output_type: ReduceType | int | None = None,
        async_gather_chunks: int = 2,
    ) -> torch.Tensor:
        plan = LinearPlan(
            bool(gather_input), bool(gather_output), bool(split_input),
            ReduceType.parse(reduce_output_type), async_gather_chunks,
        )
        comm = tp_comm()
        ctx.plan, ctx.comm = plan, comm
        ctx.save_for_backward(input, weight, bias)
        if plan.reduce is ReduceType.REDUCE_SCATTER:
            return _linear_reduce_scatter(_prepare_input(input, plan, comm), weight, bias, plan, comm)
        if plan.gather_input and plan.chunks > 1 and comm.size > 1:
            out = _gather_linear(input, weight, bias, plan, comm)
        else:
            out = F.linear(_prepare_input(input, plan, comm), weight, bias)
        if plan.gather_output:
            out = gather_last(out, comm)
        if plan.reduce is ReduceType.ALL_REDUCE:
            out = all_reduce_sum(out, comm)
        return out

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        input, weight, bias = ctx.saved_tensors
        plan: LinearPlan = ctx.plan
        comm: Communicator = ctx.comm
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        g = grad_output
        if plan.reduce is ReduceType.REDUCE_SCATTER:
            g = gather_rows(g, comm)  # dual of the reduce-scatter
        if plan.gather_output:
            g = split_last(g, comm)  # dual of the concatenation
        cur, side = _streams(g.device)

        a, a_ready = input, None
        if need_weight and plan.gather_input and comm.size > 1:
            # gather the input again on the side stream, under the input-gradient matmul
            bmt_comm.wait_stream(side, cur)
            with bmt_comm.stream_context(side):
                bmt_comm.record_stream(input, side)
                a = gather_rows(input, comm)
                a_ready = _record_event(side)

        grad_input = None
        if need_input:
            ga = g.matmul(weight)
            # the input-gradient collective runs on the side stream, under the weight-gradient matmul
            bmt_comm.wait_stream(side, cur)
            with bmt_comm.stream_context(side):
                bmt_comm.record_stream(ga, side)
                grad_input = _input_grad(ga, plan, comm)
            bmt_comm.record_stream(grad_input, cur)

        grad_weight = grad_bias = None
        g2 = g.reshape(-1, g.shape[-1])
        if need_weight:
            _wait_event(cur, a_ready)
            bmt_comm.record_stream(a, cur)
            if plan.split_input:
                a = split_last(a, comm)
            grad_weight = g2.t().matmul(a.reshape(-1, a.shape[-1]))
        if bias is not None and need_bias:
            grad_bias = g2.sum(0)
        bmt_comm.wait_stream(cur, side)
        return grad_input, grad_weight, grad_bias, None, None, None, None, None


# --- vocab-parallel embedding ----------------------------------------------------------------
def vocab_parallel_embedding(
    ids: torch.Tensor, weight: torch.Tensor, start: int, vocab_size: int, comm: Communicator
) -> torch.Tensor:
    """``F.embedding(ids, full_table)`` where each tp rank holds rows ``[start, start+len(weight))``.

    Every rank may pass different ids (same shape): the ids are all-gathered (small), each rank
    looks up the ones in its vocabulary slice (zeros elsewhere), and a reduce-scatter sums the
    slices and returns each rank its own rows. The table itself never travels.
    """
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"embedding ids must be int64 or int32, got {ids.dtype}")
    if comm.size == 1:
        return F.embedding(ids, weight)
    all_ids = gather_stacked(ids, comm)  # (size, *ids.shape)
    if all_ids.numel():  # out-of-range ids would silently embed as zeros below
        if all_ids.is_cuda:  # a device-side assert: no host sync on every forward
            torch._assert_async(((all_ids >= 0) & (all_ids < vocab_size)).all(), "embedding id out of range")
        else:
            lo, hi = (int(v) for v in torch.aminmax(all_ids))
            if lo < 0 or hi >= vocab_size:
                raise ValueError(f"embedding ids must be in [0, {vocab_size}), got ids in [{lo}, {hi}]")
    local = all_ids - start
    outside = (local < 0) | (local >= weight.shape[0])
    emb = F.embedding(local.masked_fill(outside, 0), weight)  # (size, *ids.shape, dim)
    emb = emb.masked_fill(outside.unsqueeze(-1), 0)
    out: torch.Tensor = bmt_comm.reduce_scatter(emb, bmt_comm.ReduceOp.SUM, comm)  # backward: all-gather
    return out.squeeze(0)
