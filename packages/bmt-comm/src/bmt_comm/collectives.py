"""Differentiable collectives (the reference's ``bmt.distributed``).

Backward rules follow BMTrain 1.0.1, which assumes what follows a collective is replicated over
the group (as in tensor parallelism): ``all_reduce(sum)`` passes the gradient through,
``all_gather`` keeps this rank's slice of it.
"""

from __future__ import annotations

from typing import Any

import torch

from .communicator import Communicator, ReduceOp
from .context import get_context

__all__ = [
    "all_gather",
    "all_reduce",
    "reduce_scatter",
    "broadcast",
    "send_activations",
    "recv_activations",
    "DTYPES",
]

# index <-> dtype of the activation header (the reference's order, extended)
DTYPES: tuple[torch.dtype, ...] = (
    torch.float64, torch.float32, torch.float16, torch.int64, torch.int32, torch.int16,
    torch.int8, torch.bfloat16, torch.bool, torch.uint8,
)
_HEADER = 50  # int32 slots: ndim, dtype index, dims


def _comm(comm: Communicator | None) -> Communicator:
    return comm if comm is not None else get_context().comms.world


def _prepare(x: torch.Tensor, comm: Communicator) -> torch.Tensor:
    """Non-contiguous inputs are copied; the communicator checks the device."""
    return x.contiguous()


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, comm: Communicator) -> torch.Tensor:
        ctx.comm = comm
        src = _prepare(x, comm)
        out = torch.empty((comm.size, *x.shape), dtype=x.dtype, device=x.device)
        comm.all_gather(src, out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad[ctx.comm.rank].clone(), None


class _AllReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, op: ReduceOp, comm: Communicator) -> torch.Tensor:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        comm.all_reduce(_prepare(x, comm), op, out)
        ctx.op, ctx.size = op, comm.size
        if op in (ReduceOp.MAX, ReduceOp.MIN, ReduceOp.PROD):
            ctx.save_for_backward(x, out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        op = ctx.op
        if op is ReduceOp.SUM:
            return grad, None, None
        if op is ReduceOp.AVG:
            return grad / ctx.size, None, None
        x, out = ctx.saved_tensors
        if op is ReduceOp.PROD:
            return grad * out / x, None, None
        return grad * (x == out).to(grad.dtype), None, None


class _ReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, op: ReduceOp, comm: Communicator) -> torch.Tensor:
        n = comm.size
        if x.dim() == 0 or x.shape[0] % n != 0:
            raise ValueError(
                f"reduce_scatter needs dim 0 ({x.shape[0] if x.dim() else 'scalar'}) "
                f"divisible by the group size ({n})"
            )
        out = torch.empty((x.shape[0] // n, *x.shape[1:]), dtype=x.dtype, device=x.device)
        comm.reduce_scatter(_prepare(x, comm), out, op)
        ctx.op, ctx.comm = op, comm
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        comm: Communicator = ctx.comm
        if ctx.op not in (ReduceOp.SUM, ReduceOp.AVG):
            raise NotImplementedError(f"reduce_scatter backward is not defined for op {ctx.op.value}")
        g = grad.contiguous()
        out = torch.empty((comm.size * g.shape[0], *g.shape[1:]), dtype=g.dtype, device=g.device)
        comm.all_gather(g, out)
        if ctx.op is ReduceOp.AVG:
            out = out / comm.size
        return out, None, None


class _Broadcast(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, root: int, comm: Communicator) -> torch.Tensor:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        comm.broadcast(_prepare(x, comm), root, out)
        ctx.root, ctx.comm = root, comm
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        # the reference's rule: every rank gets the sum, so replicated inputs stay replicated
        comm: Communicator = ctx.comm
        g = grad.contiguous().clone()
        comm.all_reduce(g, ReduceOp.SUM)
        return g, None, None


def all_gather(x: torch.Tensor, comm: Communicator | None = None) -> torch.Tensor:
    """Stack every rank's ``x``: shape ``(n, *x.shape)``. Backward keeps this rank's slice."""
    out: torch.Tensor = _AllGather.apply(x, _comm(comm))  # type: ignore[no-untyped-call]
    return out


def all_reduce(x: torch.Tensor, op: ReduceOp | str = "sum", comm: Communicator | None = None) -> torch.Tensor:
    """Reduce over ranks (sum, avg, max, min, prod); returns a new tensor."""
    out: torch.Tensor = _AllReduce.apply(x, ReduceOp.parse(op), _comm(comm))  # type: ignore[no-untyped-call]
    return out


def reduce_scatter(x: torch.Tensor, op: ReduceOp | str = "sum", comm: Communicator | None = None) -> torch.Tensor:
    """Reduce over ranks and keep this rank's dim-0 block ``(x.shape[0] // n, ...)``."""
    out: torch.Tensor = _ReduceScatter.apply(x, ReduceOp.parse(op), _comm(comm))  # type: ignore[no-untyped-call]
    return out


def broadcast(src: torch.Tensor, root: int, comm: Communicator | None = None) -> torch.Tensor:
    """Root's ``src`` on every rank. Backward gives every rank the sum of all ranks' gradients.

    (Argument names are 1.0.1's, so keyword calls keep working.)"""
    out: torch.Tensor = _Broadcast.apply(src, root, _comm(comm))  # type: ignore[no-untyped-call]
    return out


def send_activations(hidden_state: torch.Tensor, next_rank: int, comm: Communicator) -> None:
    """Send ``hidden_state`` (any shape, supported dtype) to group rank ``next_rank``; not differentiable."""
    x = hidden_state
    if x.dtype not in DTYPES:
        raise TypeError(f"send_activations does not support dtype {x.dtype}; supported: {DTYPES}")
    if x.dim() > _HEADER - 2:
        raise ValueError(f"send_activations supports at most {_HEADER - 2} dims, got {x.dim()}")
    header = torch.zeros(_HEADER, dtype=torch.int32, device=comm.device)
    header[0], header[1] = x.dim(), DTYPES.index(x.dtype)
    if x.dim():
        header[2 : 2 + x.dim()] = torch.tensor(x.shape, dtype=torch.int32)
    comm.send(header, next_rank)
    comm.send(x.detach().contiguous().clone(), next_rank)  # a copy: the caller may reuse x


def recv_activations(prev_rank: int, comm: Communicator) -> torch.Tensor:
    """Receive a tensor sent by ``send_activations`` from group rank ``prev_rank``."""
    header = torch.empty(_HEADER, dtype=torch.int32, device=comm.device)
    comm.recv(header, prev_rank)
    h = header.tolist()
    if not (0 <= h[0] <= _HEADER - 2 and 0 <= h[1] < len(DTYPES)):
        raise RuntimeError(
            f"recv_activations got a bad header (ndim {h[0]}, dtype index {h[1]}) from rank {prev_rank}: "
            f"the peer must call send_activations"
        )
    shape = tuple(h[2 : 2 + h[0]])
    out = torch.empty(shape, dtype=DTYPES[h[1]], device=comm.device)
    comm.recv(out, prev_rank)
    return out
