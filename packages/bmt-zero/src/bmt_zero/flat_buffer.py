"""``FlatBuffer``: the flat sharded storage of the parameters that share one ``BufferKey``.

Each rank owns one contiguous partition of the buffer (see ``flat_layout``), held by a flat
``torch.nn.Parameter`` (``shard``: what ``grouped_parameters`` hands an optimizer; it is a
``bmt_comm.Shard``); the original parameters' ``.data`` become 1-D views into it. ``gather_async``
/ ``wait`` fill the full buffer with one all-gather (the parameters become views of it after
``bind_full``), ``release`` frees it, and ``reduce_scatter_grad`` sums a full gradient over the
group into the shard's ``.grad``, accumulating until the gradients are zeroed.

The full buffer keeps one storage for its whole life and is resized to zero bytes when released,
so tensors that autograd saved as views of a parameter stay valid once it is gathered again.

Over a group of one rank (one GPU, or tensor/pipeline parallelism covering the world) there is
nothing to shard: the buffer is *in place*. The shard is the full buffer, so gathering and
releasing do nothing, and the full gradient buffer is the shard's own ``.grad``, which autograd
accumulates into directly, so the reduce-scatter has nothing left to do. Nothing is copied or
launched beyond zeroing the gradient once after it was set to None.

When the shard's gradient holds a backward's sum (after the reduce-scatter is queued, or in
place when the Block's backward is done), the buffer tells ``bmt_comm``'s gradient-ready hooks
(an offload optimizer copies it to the host then) and orders its next write or free of that
gradient after the events they hand back.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum
from typing import NamedTuple

import bmt_comm
import torch
from bmt_comm import Communicator, ReduceOp

from .flat_layout import FlatLayout
from .parameter import DistributedParameter

__all__ = ["BufferState", "FlatBuffer", "FlatInfo", "ReduceHandle", "flat_info"]

_BUILD_CHUNK_BYTES = 1 << 28  # construction stages at most this many bytes per collective


class BufferState(Enum):
    """Where a flat buffer's full tensor stands (a Block's runtime drives the transitions)."""

    RELEASED = "released"  # the full buffer holds no memory
    GATHERING = "gathering"  # an all-gather is queued on the load stream; consumers must wait for it
    GATHERED = "gathered"  # the full buffer is valid for work queued on the current stream


class FlatInfo(NamedTuple):
    """What a flat shard parameter (``FlatBuffer.shard``) is, for code that saves its state."""

    key: str  # its buffer's name, e.g. ``bfloat16_grad``
    tp_mode: bool  # its parameters are tensor-parallel (their pieces are those of one tp rank)
    content: int  # elements of the whole buffer that belong to parameters; the rest, to its end, is padding


def flat_info(t: torch.Tensor) -> FlatInfo | None:
    """``t``'s description if it is a flat buffer's shard parameter, else None. Its whole buffer
    (``bmt_comm.Shard.whole_numel``) is padded to the group size, so it differs between sizes;
    the first ``content`` elements do not."""
    info = getattr(t, "_bmt_flat_info", None)
    return info if isinstance(info, FlatInfo) else None


class ReduceHandle(NamedTuple):
    """A reduce-scatter in flight on the load stream, and the full gradient buffer it reads."""

    full_grad: torch.Tensor
    event: torch.cuda.Event | None  # recorded on the load stream after the accumulation

    def wait(self) -> None:
        """Order the current stream after the reduce-scatter; then the buffer may be dropped."""
        if self.event is not None:
            stream = bmt_comm.current_stream(self.full_grad.device)
            if stream is not None:
                stream.wait_event(self.event)


class FlatBuffer:
    """The flat storage of the parameters sharing one ``BufferKey``."""

    def __init__(
        self,
        layout: FlatLayout,
        params: Sequence[DistributedParameter],
        comm: Communicator,
        build_chunk_numel: int | None = None,
    ) -> None:
        if len(params) != len(layout.slots) or comm.size != layout.world:
            raise ValueError(
                f"layout of {len(layout.slots)} params over {layout.world} ranks does not match "
                f"{len(params)} params over a group of {comm.size}"
            )
        self.layout = layout
        self.comm = comm
        self.params = list(params)
        self.device = comm.device
        key = layout.key
        part_start, part_end = layout.partition(comm.rank)
        self.local_ranges = [slot.local_range(part_start, part_end) for slot in layout.slots]
        shard = torch.zeros(layout.partition_numel, dtype=key.dtype, device=self.device)
        self.shard = torch.nn.Parameter(shard, requires_grad=key.requires_grad)
        self.shard._bmt_flat_key = key.name  # type: ignore[attr-defined]  # its buffer's name, for debugging
        last = layout.slots[-1] if layout.slots else None
        content = last.offset + last.numel if last is not None else 0
        self.shard._bmt_flat_info = FlatInfo(key.name, key.tp_mode, content)  # type: ignore[attr-defined]
        # the flat tensor is a bmt_comm.Shard of the whole (padded) buffer over ``comm``
        bmt_comm.mark_shard(self.shard, part_start, part_end, layout.total, comm)
        self._fill_shard(build_chunk_numel)
        # a group of one: the shard already is the whole buffer, nothing is gathered or reduced
        self.in_place = comm.size == 1
        if self.in_place:
            self._full = self.shard.detach()
        else:
            # one storage for the buffer's whole life: views made now stay valid across release/gather
            self._full = torch.empty(layout.total, dtype=key.dtype, device=self.device)
        self._full_views = [self._full[s.offset : s.offset + s.numel].view(s.shape) for s in layout.slots]
        if not self.in_place:
            self._full.untyped_storage().resize_(0)
        self._shard_views = [
            self.shard.detach()[slot.offset + lo - part_start : slot.offset + hi - part_start]
            for slot, (lo, hi) in zip(layout.slots, self.local_ranges, strict=True)
        ]
        self._stashed_grads: list[torch.Tensor | None] = [None] * len(self.params)
        # events after which readers of the shard's gradient (bmt_comm.notify_grad_ready hooks, e.g. an offload
        # optimizer copying it to the host) are done: the next write or free of that gradient waits for them
        self._grad_readers: list[torch.cuda.Event] = []
        self._event: torch.cuda.Event | None = None
        self.state = BufferState.GATHERED if self.in_place else BufferState.RELEASED
        for p, view, (lo, hi) in zip(self.params, self._shard_views, self.local_ranges, strict=True):
            p._bind_storage(view, lo, hi, comm)  # its pieces now live over this buffer's group

    # --- construction ------------------------------------------------------------------
    def _fill_shard(self, chunk_numel: int | None) -> None:
        """Move every parameter's existing shard to its place in this rank's partition.

        Parameters sharded over this buffer's communicator take part in a reduce-scatter of
        zero-padded pieces (each element is non-zero on one rank only, so the sum is exact), in
        chunks of at most ``chunk_numel`` output elements; no full tensor is ever built. Others
        (sharded over another group) are all-gathered one at a time and their slice is kept.
        """
        itemsize = self.shard.element_size()
        chunk = chunk_numel or max(1, _BUILD_CHUNK_BYTES // (itemsize * self.comm.size))
        n, part = self.comm.size, self.layout.partition_numel
        shard = self.shard.detach()
        direct = [(s, p) for s, p in zip(self.layout.slots, self.params, strict=True) if p._zero_comm is self.comm]
        if direct and part:
            for c0 in range(0, part, chunk):
                c1 = min(part, c0 + chunk)
                width = c1 - c0
                staged = torch.zeros(n * width, dtype=shard.dtype, device=self.device)
                for slot, p in direct:
                    a = slot.offset + p._start_partition
                    b = slot.offset + p._end_partition
                    src = p.detach().reshape(-1)
                    for q in range(n):
                        w0 = q * part + c0
                        lo, hi = max(a, w0), min(b, w0 + width)
                        if lo < hi:
                            staged[q * width + lo - w0 : q * width + hi - w0].copy_(src[lo - a : hi - a])
                self.comm.reduce_scatter(staged, shard[c0:c1], ReduceOp.SUM)
        part_start = self.layout.partition(self.comm.rank)[0]
        for slot, p, (lo, hi) in zip(self.layout.slots, self.params, self.local_ranges, strict=True):
            if p._zero_comm is self.comm:
                continue
            full = _gather_param(p)
            dst = slot.offset + lo - part_start
            shard[dst : dst + hi - lo].copy_(full[lo:hi])

    # --- gather / release --------------------------------------------------------------
    def gather_async(self, force: bool = False) -> None:
        """Queue the all-gather of the full buffer on the load stream (no-op if already there,
        unless ``force``: then gather again into the held memory, e.g. after an update)."""
        # an update still landing (an offload optimizer's overlap_forward) must be in the shard first
        if bmt_comm.has_param_waits():
            bmt_comm.wait_param_writes([self.shard, *self.params])
        if self.state is not BufferState.RELEASED and not force:
            return
        if self.layout.total == 0 or self.in_place:
            self.state = BufferState.GATHERED
            return
        if self.state is BufferState.RELEASED:
            # allocated on the current (compute) stream, so freeing it there later is stream-ordered
            self._full.untyped_storage().resize_(self._full.numel() * self._full.element_size())
        streams = bmt_comm.get_context().streams
        current = bmt_comm.current_stream(self.device)
        # the load stream must not overwrite memory that queued compute still reads, nor read a stale shard
        bmt_comm.wait_stream(streams.load, current)
        with bmt_comm.stream_context(streams.load):
            self.comm.all_gather(self.shard.detach(), self._full)
            if streams.load is not None:
                if self._event is None:
                    self._event = torch.cuda.Event()  # type: ignore[no-untyped-call]
                self._event.record(streams.load)
        self.state = BufferState.GATHERING if streams.load is not None else BufferState.GATHERED

    def wait(self) -> None:
        """Make the current stream wait for the gather (queueing it first if needed)."""
        if self.state is BufferState.RELEASED:
            self.gather_async()
        if self.state is BufferState.GATHERING:
            stream = bmt_comm.current_stream(self.device)
            if stream is not None and self._event is not None:
                stream.wait_event(self._event)
            self.state = BufferState.GATHERED

    def release(self) -> None:
        """Free the full buffer's memory (params must be bound to their shards); in place there is
        no memory of its own to free."""
        if self.state is BufferState.RELEASED or self.in_place:
            return
        self.wait()  # never free memory that a queued all-gather still writes
        self._full.untyped_storage().resize_(0)
        self.state = BufferState.RELEASED

    # --- binding -----------------------------------------------------------------------
    def bind_full(self, grads: torch.Tensor | None = None) -> None:
        """Params become full views of the gathered buffer; with ``grads`` (a full gradient
        buffer) their ``.grad`` become views of it, so autograd accumulates there."""
        if self.state is not BufferState.GATHERED:
            raise RuntimeError(f"flat buffer {self.layout.key.name} must be gathered before binding, is {self.state.value}")
        grad_views = None if grads is None else self._views_of(grads)
        if grads is None and self.shard.grad is not None and all(p.grad is None for p in self.params):
            # an optimizer over the params themselves set every .grad to None: no value of the
            # flat gradient is kept, so let it go now, before the forward's activations pile up
            self._fence_grad_readers()
            self.shard.grad = None
        # after zero_grad(set_to_none) on the flat parameter, the params' .grad are views of a
        # buffer nobody else holds: drop them here (the next forward) so that buffer is freed
        # before the backward allocates a new one, instead of living on beside it
        dropped = self.shard.grad is None
        for i, p in enumerate(self.params):
            self._stashed_grads[i] = None if dropped else p.grad
            p.grad = None
            p.data = self._full_views[i]
            if grad_views is not None and p.requires_grad:
                p.grad = grad_views[i]

    def bind_shard(self) -> None:
        """Params become views of this rank's shard again (their shard gradients restored)."""
        for i, p in enumerate(self.params):
            p.grad = None
            p.data = self._shard_views[i]
            p.grad = self._stashed_grads[i]
            self._stashed_grads[i] = None

    def full_view(self, index: int) -> torch.Tensor:
        if self.state is not BufferState.GATHERED:
            raise RuntimeError(f"flat buffer {self.layout.key.name} is {self.state.value}, not gathered")
        return self._full_views[index]

    def _views_of(self, full: torch.Tensor) -> list[torch.Tensor]:
        return [full[s.offset : s.offset + s.numel].view(s.shape) for s in self.layout.slots]

    # --- gradients ---------------------------------------------------------------------
    @property
    def trainable(self) -> bool:
        """Whether a backward gives this buffer gradients now: it keeps gradients and at least
        one of its parameters requires grad (a parameter frozen after the build does not)."""
        return self.layout.key.requires_grad and any(p.requires_grad for p in self.params)

    def new_full_grad(self) -> torch.Tensor:
        """A full-size gradient buffer for autograd to accumulate into (on the current stream):
        a new zeroed one, or in place the shard's ``.grad`` itself, zeroed where nothing is kept."""
        if self.in_place:
            grad, overwrite = self._attach_grads()
            if overwrite:
                grad.zero_()
            return grad
        return torch.zeros(self.layout.total, dtype=self.layout.key.dtype, device=self.device)

    def reduce_scatter_grad(self, full_grad: torch.Tensor) -> ReduceHandle:
        """Sum ``full_grad`` over the group into the shard's ``.grad`` (on the load stream).

        Accumulates onto the existing gradient. A parameter whose ``.grad`` was set to None (or
        replaced) since the last call starts from zero, as does everything when the flat
        parameter's ``.grad`` is None. Each parameter's ``.grad`` is then a view of the shard's.
        Keep the returned handle until its ``wait()``: ``full_grad`` must outlive the collective.
        In place, ``full_grad`` is the shard's gradient (``new_full_grad``): already summed there.
        """
        if self.in_place:
            if full_grad is not self.shard.grad:
                raise RuntimeError(
                    f"flat buffer {self.layout.key.name} is in place (a group of one): its full gradient is the "
                    "shard's .grad from new_full_grad(), which was replaced or dropped before the reduction"
                )
            self._notify_grad_ready(bmt_comm.current_stream(self.device))
            return ReduceHandle(full_grad, None)
        grad, overwrite = self._attach_grads()
        if self.layout.total == 0:
            return ReduceHandle(full_grad, None)
        streams = bmt_comm.get_context().streams
        # gradients were produced on the current stream; the reduce-scatter must follow them
        bmt_comm.wait_stream(streams.load, bmt_comm.current_stream(self.device))
        event: torch.cuda.Event | None = None
        with bmt_comm.stream_context(streams.load):
            if overwrite:  # nothing to keep: no temporary, no addition
                self.comm.reduce_scatter(full_grad, grad, ReduceOp.SUM)
            else:
                part = torch.empty(self.layout.partition_numel, dtype=grad.dtype, device=self.device)
                self.comm.reduce_scatter(full_grad, part, ReduceOp.SUM)
                grad.add_(part)
            if streams.load is not None:
                event = torch.cuda.Event()  # type: ignore[no-untyped-call]
                event.record(streams.load)
        self._notify_grad_ready(streams.load)
        return ReduceHandle(full_grad, event)

    def _notify_grad_ready(self, stream: torch.cuda.Stream | None) -> None:
        """The shard's gradient holds this backward's sum (written on ``stream``): tell the hooks."""
        if bmt_comm.has_grad_ready_hooks() and self.shard.grad is not None:
            self._grad_readers += bmt_comm.notify_grad_ready([self.shard, *self.params], stream)

    def _fence_grad_readers(self) -> None:
        """Order the current stream (where the gradient is next written or freed) after its readers."""
        if not self._grad_readers:
            return
        readers, self._grad_readers = self._grad_readers, []
        stream = bmt_comm.current_stream(self.device)
        if stream is not None:
            for event in readers:
                stream.wait_event(event)

    def _attach_grads(self) -> tuple[torch.Tensor, bool]:
        """The shard's gradient, every trainable parameter's ``.grad`` a view of it, and whether
        none of its values is to be kept (then the reduce-scatter overwrites it). A frozen
        parameter's ``.grad`` is left as it is: when it is still a view of the shard's gradient,
        its values are kept (the reduce adds zeros there), as torch leaves a frozen ``.grad``
        alone. Allocated, and stale parts zeroed, on the current stream, which the load stream
        waits for."""
        self._fence_grad_readers()
        fresh = self.shard.grad is None
        if fresh:
            self.shard.grad = torch.empty_like(self.shard.detach())
        grad = self.shard.grad
        assert grad is not None
        part_start = self.layout.partition(self.comm.rank)[0]
        stale: list[tuple[DistributedParameter, int, int]] = []
        kept = False
        for slot, p, (lo, hi) in zip(self.layout.slots, self.params, self.local_ranges, strict=True):
            dst = slot.offset + lo - part_start
            if _is_view_at(p.grad, grad, dst, hi - lo):
                kept = kept or hi > lo
            elif p.requires_grad:
                stale.append((p, dst, hi - lo))
        overwrite = fresh or not kept
        for p, dst, n in stale:
            if not overwrite:
                grad[dst : dst + n].zero_()
            p.grad = grad[dst : dst + n]
        return grad, overwrite

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._fence_grad_readers()
        if set_to_none:
            self.shard.grad = None
            for p in self.params:
                p.grad = None
        elif self.shard.grad is not None:
            self.shard.grad.zero_()

    # --- checkpoint values -------------------------------------------------------------
    def load_full(self, index: int, full: torch.Tensor) -> None:
        """Keep this rank's part of parameter ``index``'s full value."""
        slot = self.layout.slots[index]
        if full.shape != slot.shape:
            raise ValueError(
                f"parameter '{slot.name}' has shape {tuple(slot.shape)}, got a tensor of shape {tuple(full.shape)}"
            )
        lo, hi = self.local_ranges[index]
        src = full.detach().reshape(-1)[lo:hi].to(device=self.device, dtype=self.layout.key.dtype)
        with torch.no_grad():
            self._shard_views[index].copy_(src)


def _is_view_at(t: torch.Tensor | None, base: torch.Tensor, offset: int, numel: int) -> bool:
    """Whether ``t`` is ``base[offset : offset + numel]``. An empty ``t`` must still be a view of
    ``base``: an empty view of an older buffer would keep that whole buffer alive."""
    if t is None or t.numel() != numel:
        return False
    if t.untyped_storage().data_ptr() != base.untyped_storage().data_ptr():
        return False
    return numel == 0 or t.storage_offset() == base.storage_offset() + offset


def _gather_param(p: DistributedParameter) -> torch.Tensor:
    """The flattened full value of a (not yet flat-stored) parameter, from its own group."""
    part, comm = p._partition, p._zero_comm
    src = torch.zeros(part.shard_numel, dtype=p.dtype, device=comm.device)
    src[: part.local_numel].copy_(p.detach().reshape(-1))
    out = torch.empty(part.padded_numel, dtype=p.dtype, device=comm.device)
    comm.all_gather(src, out)
    return out[: part.numel]
