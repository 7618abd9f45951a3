"""Point-to-point plumbing of the pipeline, as autograd functions.

One rank per stage forms the pipe group (``ctx.comms.pipe``; group rank = stage id). Every pipe
op runs on ``streams.pp_comm`` (so sends overlap compute on CUDA and every op of the pipe
communicator is issued from one stream, as NCCL requires), and the compute stream waits for
results it reads. On CPU the stream helpers are no-ops.

Graph shape on each rank (``M`` micro-batches), so that one ``loss.backward()`` runs every
stage's share in a matching order::

    hidden --PipeIn--> source --(stage 0: slice m | else: StageRecv)--> layers --StageSend--> ...
    ... (M micro outputs, gathered args) --PipeOut--> this rank's rows of the output

An ``anchor`` leaf that requires grad enters ``PipeIn`` so every stage's graph is connected even
when ``hidden`` needs no gradient.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import bmt_comm
import torch
from bmt_comm import Communicator

from .pipe_schedule import MicroBatches

__all__ = [
    "PipeLink",
    "PipeIn",
    "StageRecv",
    "StageSend",
    "PipeOut",
    "BatchArg",
    "HiddenStatesToOwners",
    "TieToInput",
]


@dataclass(frozen=True)
class PipeLink:
    """This rank's pipe group: ``comm.rank`` is its stage, ``comm.size`` the number of stages."""

    comm: Communicator
    stream: Any  # streams.pp_comm (None on CPU): every op on the pipe communicator runs here
    device: torch.device

    @classmethod
    def current(cls) -> PipeLink:
        ctx = bmt_comm.get_context()
        return cls(ctx.comms.pipe, ctx.streams.pp_comm, ctx.device)

    @property
    def stage(self) -> int:
        return self.comm.rank

    @property
    def stages(self) -> int:
        return self.comm.size

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.stages - 1

    @contextlib.contextmanager
    def on_stream(self, wait_after: bool = True) -> Iterator[None]:
        """Run pipe ops on the pipe stream after the compute queued so far; then (``wait_after``)
        make compute wait for them."""
        cur = bmt_comm.current_stream(self.device)
        bmt_comm.wait_stream(self.stream, cur)
        with bmt_comm.stream_context(self.stream):
            yield
        if wait_after:
            bmt_comm.wait_stream(cur, self.stream)

    def send_activation(self, x: torch.Tensor, peer: int) -> None:
        with self.on_stream(wait_after=False):
            bmt_comm.record_stream(x, self.stream)
            bmt_comm.send_activations(x, peer, self.comm)

    def recv_activation(self, peer: int) -> torch.Tensor:
        with self.on_stream():
            out = bmt_comm.recv_activations(peer, self.comm)
        bmt_comm.record_stream(out, bmt_comm.current_stream(self.device))
        return out

    def exchange(self, sends: Sequence[tuple[torch.Tensor, int]], recvs: Sequence[tuple[torch.Tensor, int]]) -> None:
        """Post these sends and receives (of known shapes) together, so their order cannot deadlock."""
        with self.on_stream():
            with self.comm.group():
                for t, peer in sends:
                    bmt_comm.record_stream(t, self.stream)
                    self.comm.send(t, peer)
                for t, peer in recvs:
                    bmt_comm.record_stream(t, self.stream)
                    self.comm.recv(t, peer)


class PipeIn(torch.autograd.Function):
    """Stage 0 gets the pipe group's hidden states (members' rows in stage order); other stages
    get an empty placeholder. Backward returns each member the gradient of its own rows."""

    @staticmethod
    def forward(ctx: Any, anchor: torch.Tensor, hidden: torch.Tensor, link: PipeLink) -> torch.Tensor:
        ctx.link, ctx.shape = link, hidden.shape
        if not link.is_first:
            link.send_activation(hidden, 0)
            return hidden.new_empty(0)
        parts = [hidden.detach()]
        for member in range(1, link.stages):
            part = link.recv_activation(member)
            if part.shape != hidden.shape or part.dtype != hidden.dtype:
                raise ValueError(
                    f"every rank of a pipe group must pass hidden states of one shape and dtype: "
                    f"stage 0 has {tuple(hidden.shape)} {hidden.dtype}, stage {member} sent "
                    f"{tuple(part.shape)} {part.dtype}"
                )
            parts.append(part)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, torch.Tensor | None, None]:
        link: PipeLink = ctx.link
        if link.is_first:
            chunks = torch.split(grad.contiguous(), ctx.shape[0], dim=0)
            link.exchange([(chunks[m].contiguous(), m) for m in range(1, link.stages)], [])
            own = chunks[0]
        else:
            own = torch.empty(ctx.shape, dtype=grad.dtype, device=grad.device)
            link.exchange([], [(own, 0)])
        return None, (own if ctx.needs_input_grad[1] else None), None


class TieToInput(torch.autograd.Function):
    """``out`` unchanged, tied to the stage's input ``entry``: when a stage runs its layers on the
    input detached (nothing before it trains), its backward still reaches the pipe ops of the
    input (collectives every stage runs) and sends them a zero gradient."""

    @staticmethod
    def forward(ctx: Any, out: torch.Tensor, entry: torch.Tensor) -> torch.Tensor:
        ctx.entry_shape, ctx.entry_dtype, ctx.entry_device = entry.shape, entry.dtype, entry.device
        return out.view_as(out)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        zeros = torch.zeros(ctx.entry_shape, dtype=ctx.entry_dtype, device=ctx.entry_device)
        return (grad if ctx.needs_input_grad[0] else None), (zeros if ctx.needs_input_grad[1] else None)


class StageRecv(torch.autograd.Function):
    """A micro-batch's input from the previous stage; backward sends its gradient back."""

    @staticmethod
    def forward(ctx: Any, source: torch.Tensor, link: PipeLink) -> torch.Tensor:
        ctx.link = link
        return link.recv_activation(link.stage - 1)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, None]:
        link: PipeLink = ctx.link
        link.exchange([(grad.contiguous(), link.stage - 1)], [])
        return None, None


class StageSend(torch.autograd.Function):
    """Send a micro-batch's output to the next stage (returns an empty placeholder); backward
    receives the output's gradient from the next stage."""

    @staticmethod
    def forward(ctx: Any, out: torch.Tensor, link: PipeLink) -> torch.Tensor:
        ctx.link, ctx.shape, ctx.dtype = link, out.shape, out.dtype
        link.send_activation(out.detach(), link.stage + 1)
        return out.new_empty(0)

    @staticmethod
    def backward(ctx: Any, _placeholder_grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        link: PipeLink = ctx.link
        grad = torch.empty(ctx.shape, dtype=ctx.dtype, device=link.device)
        link.exchange([], [(grad, link.stage + 1)])
        return grad, None


class PipeOut(torch.autograd.Function):
    """The last stage's micro outputs, concatenated, cut back into the members' rows: each pipe
    rank gets the rows matching its input. ``extra`` tensors only keep their producers in every
    stage's graph (so collective backward steps run on every stage); they get no gradient."""

    @staticmethod
    def forward(ctx: Any, link: PipeLink, batches: MicroBatches, n_outs: int, *tensors: torch.Tensor) -> torch.Tensor:
        ctx.link, ctx.batches, ctx.n_outs, ctx.n_extra = link, batches, n_outs, len(tensors) - n_outs
        if not link.is_last:
            return link.recv_activation(link.stages - 1)
        full = torch.cat([t.detach() for t in tensors[:n_outs]], dim=0)
        rows = [full[batches.rows_of_member(m).start : batches.rows_of_member(m).stop] for m in range(link.stages)]
        for m in range(link.stages - 1):
            link.send_activation(rows[m], m)
        ctx.row_shape = rows[-1].shape
        return rows[-1].clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        link: PipeLink = ctx.link
        batches: MicroBatches = ctx.batches
        n_outs: int = ctx.n_outs
        n_extra: int = ctx.n_extra
        if not link.is_last:
            link.exchange([(grad.contiguous(), link.stages - 1)], [])
            return (None,) * (3 + n_outs + n_extra)
        full = torch.empty((batches.total, *ctx.row_shape[1:]), dtype=grad.dtype, device=grad.device)
        own = batches.rows_of_member(link.stages - 1)
        full[own.start : own.stop].copy_(grad)
        recvs = []
        for m in range(link.stages - 1):
            rows = batches.rows_of_member(m)
            recvs.append((full[rows.start : rows.stop], m))  # dim-0 slices of a contiguous tensor
        link.exchange([], recvs)
        micro_grads = torch.split(full, list(batches.sizes), dim=0)
        return (None, None, None, *micro_grads) + (None,) * n_extra


class BatchArg(torch.autograd.Function):
    """A batch-related argument: the members' rows concatenated in stage order. Backward sums
    the stages' gradients and returns each member its rows (a reduce-scatter)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, link: PipeLink) -> torch.Tensor:
        ctx.link = link
        out = torch.empty((link.stages * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
        with link.on_stream():
            src = x.detach().contiguous()
            bmt_comm.record_stream(src, link.stream)
            bmt_comm.record_stream(out, link.stream)
            link.comm.all_gather(src, out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        link: PipeLink = ctx.link
        g = grad.contiguous()
        out = torch.empty((g.shape[0] // link.stages, *g.shape[1:]), dtype=g.dtype, device=g.device)
        with link.on_stream():
            bmt_comm.record_stream(g, link.stream)
            bmt_comm.record_stream(out, link.stream)
            link.comm.reduce_scatter(g, out, bmt_comm.ReduceOp.SUM)
        return out, None


class HiddenStatesToOwners(torch.autograd.Function):
    """Stage ``s`` holds the inputs of its layers for the whole batch ``(L_s, total, ...)``; every
    member gets every layer's inputs for its own rows ``(L, local, ...)`` (an all-to-all)."""

    @staticmethod
    def forward(
        ctx: Any, mine: torch.Tensor, link: PipeLink, batches: MicroBatches, layers_per_stage: tuple[int, ...]
    ) -> torch.Tensor:
        ctx.link, ctx.batches, ctx.layers = link, batches, layers_per_stage
        ctx.shape = mine.shape
        starts = [sum(layers_per_stage[:s]) for s in range(link.stages)]
        out = torch.empty(
            (sum(layers_per_stage), batches.local, *mine.shape[2:]), dtype=mine.dtype, device=mine.device
        )
        own_rows = batches.rows_of_member(link.stage)
        own_layers = slice(starts[link.stage], starts[link.stage] + layers_per_stage[link.stage])
        out[own_layers].copy_(mine[:, own_rows.start : own_rows.stop])
        sends = []
        for m in range(link.stages):
            if m != link.stage:
                rows = batches.rows_of_member(m)
                sends.append((mine[:, rows.start : rows.stop].contiguous(), m))
        recvs = [(out[starts[s] : starts[s] + layers_per_stage[s]], s) for s in range(link.stages) if s != link.stage]
        link.exchange(sends, recvs)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        link: PipeLink = ctx.link
        batches: MicroBatches = ctx.batches
        layers: tuple[int, ...] = ctx.layers
        starts = [sum(layers[:s]) for s in range(link.stages)]
        g = grad.contiguous()
        out = torch.empty(ctx.shape, dtype=g.dtype, device=g.device)
        own_rows = batches.rows_of_member(link.stage)
        out[:, own_rows.start : own_rows.stop].copy_(g[starts[link.stage] : starts[link.stage] + layers[link.stage]])
        sends = [(g[starts[s] : starts[s] + layers[s]], s) for s in range(link.stages) if s != link.stage]
        recv_bufs = []
        for m in range(link.stages):
            if m != link.stage:
                buf = torch.empty((ctx.shape[0], batches.local, *ctx.shape[2:]), dtype=g.dtype, device=g.device)
                recv_bufs.append((buf, m))
        link.exchange(sends, recv_bufs)
        for buf, m in recv_bufs:
            rows = batches.rows_of_member(m)
            out[:, rows.start : rows.stop].copy_(buf)
        return out, None, None, None
