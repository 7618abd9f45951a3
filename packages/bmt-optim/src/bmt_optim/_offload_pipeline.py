"""The chunked device->host->device pipeline of the offload optimizer.

Parameters are cut into chunks of at most ``chunk_numel`` elements. A ring of ``num_slots``
pinned staging slots (one gradient buffer and one output buffer each) lets three things overlap:
the gradient of chunk k+1.. copying device->host on one side stream, the CPU Adam of chunk k, and
the new parameter values of chunk k-1 copying host->device on another side stream. Events tell
the CPU when a gradient has landed and when an output buffer may be reused.

Parameters on the CPU go through the very same loop; their "transfers" are plain copies.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ._torch_adam import TorchAdamArgs
from .kernels_adam import AdamScalars

__all__ = ["OffloadItem", "OffloadPipeline", "UpdateFn", "UpdateScalars"]

UpdateScalars = AdamScalars | TorchAdamArgs  # the fused kernel's constants, or torch's Adam arguments (fp32)
UpdateFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, UpdateScalars, torch.Tensor | None], None
]  # (master, exp_avg, exp_avg_sq, grad, out, scalars, delta): the CPU Adam on host tensors


class OffloadItem(NamedTuple):
    """One parameter to update: flat device views and its flat host state."""

    param: torch.Tensor  # 1-D view of the parameter's data (device or CPU)
    grad: torch.Tensor  # 1-D view of its gradient (same device)
    master: torch.Tensor  # 1-D fp32 host master copy
    exp_avg: torch.Tensor  # 1-D fp32 host
    exp_avg_sq: torch.Tensor  # 1-D fp32 host
    scalars: UpdateScalars
    delta: torch.Tensor | None = None  # float64 [sum, sum of squares] of the update direction, or None


class _Chunk(NamedTuple):
    """What passes from the D2H stage to the CPU stage to the H2D stage."""

    item: OffloadItem
    start: int
    end: int


@dataclass
class _Slot:
    grad: torch.Tensor  # uint8 staging for a gradient chunk (pinned when CUDA exists)
    out: torch.Tensor  # uint8 staging for the new parameter chunk
    d2h_done: torch.cuda.Event | None  # the gradient chunk has landed in `grad`
    h2d_done: torch.cuda.Event | None  # `out` has been copied to the device and may be rewritten


class OffloadPipeline:
    def __init__(self, chunk_numel: int, num_slots: int = 3) -> None:
        if chunk_numel < 1:
            raise ValueError(f"chunk_numel must be >= 1, got {chunk_numel}")
        if num_slots < 2:
            raise ValueError(f"num_slots must be >= 2 (one in the CPU stage, one in flight), got {num_slots}")
        self.chunk_numel = chunk_numel
        self.num_slots = num_slots
        self._slots: dict[torch.device, list[_Slot]] = {}
        # why: copies on their own streams overlap each other, the CPU work and later compute
        self._d2h: dict[torch.device, torch.cuda.Stream] = {}
        self._h2d: dict[torch.device, torch.cuda.Stream] = {}

    def _slots_for(self, device: torch.device, numel: int) -> list[_Slot]:
        """The ring for ``device``, each buffer big enough for ``numel`` fp32 elements."""
        have = self._slots.get(device)
        if have is None or have[0].grad.numel() < numel * 4:
            pin = torch.cuda.is_available()  # page-locked memory is what makes copies asynchronous
            nbytes = numel * 4
            self._slots[device] = [
                _Slot(
                    grad=torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin),
                    out=torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin),
                    d2h_done=torch.cuda.Event() if device.type == "cuda" else None,  # type: ignore[no-untyped-call]
                    h2d_done=torch.cuda.Event() if device.type == "cuda" else None,  # type: ignore[no-untyped-call]
                )
                for _ in range(self.num_slots)
            ]
            if device.type == "cuda" and device not in self._d2h:
                self._d2h[device] = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
                self._h2d[device] = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
        return self._slots[device]

    def run(self, items: list[OffloadItem], update: UpdateFn) -> None:
        by_device: dict[torch.device, list[_Chunk]] = {}
        for it in items:
            n = it.param.numel()
            chunks = by_device.setdefault(_normalize(it.param.device), [])
            chunks.extend(_Chunk(it, a, min(n, a + self.chunk_numel)) for a in range(0, n, self.chunk_numel))
        for device, chunks in by_device.items():
            if chunks:
                self._run_device(device, chunks, update)

    def _run_device(self, device: torch.device, chunks: list[_Chunk], update: UpdateFn) -> None:
        # staging sized by the largest chunk actually used: a small model pins little memory
        slots = self._slots_for(device, max(c.end - c.start for c in chunks))
        cuda = device.type == "cuda"
        d2h, h2d = (self._d2h[device], self._h2d[device]) if cuda else (None, None)
        current = torch.cuda.current_stream(device) if cuda else None
        if d2h is not None and h2d is not None and current is not None:
            d2h.wait_stream(current)  # the gradients were produced on the caller's stream
            h2d.wait_stream(current)  # work queued there may still read the parameters

        def fetch(k: int) -> None:  # D2H of chunk k into its slot's gradient buffer
            c, slot = chunks[k], slots[k % len(slots)]
            dst = _view(slot.grad, c.item.grad.dtype, c.end - c.start)
            src = c.item.grad[c.start : c.end]
            if d2h is None:
                dst.copy_(src)
                return
            with torch.cuda.stream(d2h):
                dst.copy_(src, non_blocking=True)
            if slot.d2h_done is not None:
                slot.d2h_done.record(d2h)

        depth = len(slots) - 1  # chunks fetched ahead of the CPU stage
        for k in range(min(depth, len(chunks))):
            fetch(k)
        for k, c in enumerate(chunks):
            if k + depth < len(chunks):
                fetch(k + depth)  # reuses the slot of chunk k-1, which the CPU is done with
            slot = slots[k % len(slots)]
            if slot.d2h_done is not None and slot.h2d_done is not None:
                slot.d2h_done.synchronize()
                slot.h2d_done.synchronize()  # the H2D of chunk k-num_slots no longer reads `out`
            n = c.end - c.start
            grad = _view(slot.grad, c.item.grad.dtype, n)
            out = _view(slot.out, c.item.param.dtype, n)
            it = c.item
            update(
                it.master[c.start : c.end],
                it.exp_avg[c.start : c.end],
                it.exp_avg_sq[c.start : c.end],
                grad,
                out,
                it.scalars,
                it.delta,
            )
            dst = it.param[c.start : c.end]
            if h2d is None:
                dst.copy_(out)
                continue
            with torch.cuda.stream(h2d):
                dst.copy_(out, non_blocking=True)
            if slot.h2d_done is not None:
                slot.h2d_done.record(h2d)
        if current is not None and h2d is not None:
            current.wait_stream(h2d)  # later work on the caller's stream sees the new parameters


def _view(buf: torch.Tensor, dtype: torch.dtype, n: int) -> torch.Tensor:
    size = torch.empty((), dtype=dtype).element_size()
    return buf[: n * size].view(dtype)


def _normalize(device: torch.device) -> torch.device:
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device
