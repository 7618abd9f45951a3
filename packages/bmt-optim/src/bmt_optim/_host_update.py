"""The offload update when the gradients are already on the host (``overlap``/``delay_update``).

Chunk by chunk: the CPU Adam reads the host gradient and writes the new low-precision values
(into the gradient's own host memory when the dtypes match: each element is read before it is
written), and each chunk's host->device copy is queued on a side stream at once, so the copies
overlap the CPU work of the next chunks. The caller passes where the values go: the parameters
themselves (exact), or device staging tensors that the next step copies in (delayed).

With a ``CpuAdamQueue`` the update has two halves: ``start_host_update`` queues the C++ chunks
(they then run back to back on the queue's thread, whoever holds the GIL), and ``HostUpdate.land``
waits for each chunk in order, queues its copy, and runs the chunks the queue does not take (fp32
parameters: torch's Adam) itself. Without a queue ``land`` calls the update function per chunk.
"""

from __future__ import annotations

import concurrent.futures
import time
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ._offload_pipeline import OffloadItem, UpdateFn
from .cpu_adam import CpuAdamQueue
from .kernels_adam import AdamScalars

__all__ = ["HostJob", "HostResult", "HostUpdate", "Landing", "start_host_update", "update_from_host"]


Streams = dict[torch.device, torch.cuda.Stream]  # per device: the side stream of the host->device copies
Events = dict[torch.device, list[torch.cuda.Event]]  # per device: what those copies wait for first


class HostJob(NamedTuple):
    item: OffloadItem  # master, moments, scalars (item.param and item.grad are not read)
    grad: torch.Tensor  # 1-D host gradient
    out: torch.Tensor  # 1-D host buffer of the target's dtype (may be ``grad`` itself)
    target: torch.Tensor  # 1-D: where the new values go (device or CPU)
    # the new master and moments go here instead of over the item's (out of place; C++ chunks only)
    into: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None


class HostResult(NamedTuple):
    done: dict[torch.device, torch.cuda.Event]  # per device: after the last host->device copy
    cpu_seconds: float  # time inside the CPU Adam (the queue's own timing for queued chunks)


class _Chunk(NamedTuple):
    job: HostJob
    start: int
    end: int
    ticket: int | None  # the queue's ticket, or None: ``land`` runs this chunk itself


class HostUpdate:
    """An update whose C++ chunks may already be running on a queue; ``land`` finishes it."""

    def __init__(self, chunks: list[_Chunk], queue: CpuAdamQueue | None) -> None:
        self._chunks = chunks
        self._queue = queue
        self._next = 0

    def land(self, update: UpdateFn, h2d: Streams, after: Events) -> HostResult:
        """Finish every chunk in order and queue its copy; returns, per device, an event after the
        last host->device copy (the host buffers may be rewritten, and the targets read, once it
        has passed), and the CPU Adam's time. ``h2d`` waits for the events ``after[device]`` first
        (the work that may still read the targets). On an error, every queued chunk has finished
        (or been waited for) before it propagates: none writes memory the caller then releases."""
        self._next = 0  # the first chunk not finished yet
        try:
            return self._land(update, h2d, after)
        except BaseException:
            if self._queue is not None:
                self._queue.settle([c.ticket for c in self._chunks[self._next :] if c.ticket is not None])
            raise

    def settle(self) -> None:
        """Wait for every queued chunk, ignoring their errors, and copy nothing: an update that is
        dropped (undone) leaves no job that still reads or writes its memory."""
        if self._queue is not None:
            self._queue.settle([c.ticket for c in self._chunks if c.ticket is not None])

    def _land(self, update: UpdateFn, h2d: Streams, after: Events) -> HostResult:
        waited: set[torch.device] = set()
        cpu = 0.0
        for job, a, b, ticket in self._chunks:
            it, out = job.item, job.out[a:b]
            device = job.target.device
            cuda = device.type == "cuda"
            if cuda and device not in waited:
                waited.add(device)
                for event in after.get(device, ()):
                    h2d[device].wait_event(event)
            self._next += 1  # (a failed wait pops its ticket: it is not waited for again)
            if ticket is not None:
                assert self._queue is not None
                cpu += self._queue.wait(ticket)
            else:
                t0 = time.perf_counter()
                update(it.master[a:b], it.exp_avg[a:b], it.exp_avg_sq[a:b], job.grad[a:b], out, it.scalars, it.delta)
                cpu += time.perf_counter() - t0
            dst = job.target[a:b]
            if cuda:
                with torch.cuda.stream(h2d[device]):
                    dst.copy_(out, non_blocking=True)
            else:
                dst.copy_(out)
        done: dict[torch.device, torch.cuda.Event] = {}
        for device in waited:
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record(h2d[device])
            done[device] = event
        return HostResult(done, cpu)


@dataclass
class Landing:
    """An update started during backward whose new values are copied in when a Block first reads
    them (``overlap_forward``), or at the latest by ``finish_update``."""

    fed: concurrent.futures.Future[HostUpdate]  # the feeder thread's start of the update
    after: Events  # what its host->device copies wait for
    params: list[torch.Tensor]


def start_host_update(
    jobs: list[HostJob], chunk_numel: int, queue: CpuAdamQueue | None, priority: int = 0
) -> HostUpdate:
    """Cut ``jobs`` into chunks; with a queue, submit the C++ ones (``AdamScalars``) now, at
    ``priority`` (queued chunks run the highest priority first)."""
    chunks: list[_Chunk] = []
    try:
        for job in jobs:
            it, n = job.item, job.target.numel()
            native = queue is not None and isinstance(it.scalars, AdamScalars)
            if job.into is not None and not native:
                raise ValueError("an out-of-place update (HostJob.into) runs on the C++ queue only")
            for a in range(0, n, chunk_numel):
                b = min(n, a + chunk_numel)
                ticket = None
                if native:
                    assert queue is not None and isinstance(it.scalars, AdamScalars)
                    sl = slice(a, b)
                    into = None if job.into is None else (job.into[0][sl], job.into[1][sl], job.into[2][sl])
                    ticket = queue.submit(
                        it.master[sl], it.exp_avg[sl], it.exp_avg_sq[sl], job.grad[sl], job.out[sl], it.scalars, it.delta,
                        priority, into,
                    )
                chunks.append(_Chunk(job, a, b, ticket))
    except BaseException:
        if queue is not None:
            queue.settle([c.ticket for c in chunks if c.ticket is not None])
        raise
    return HostUpdate(chunks, queue)


def update_from_host(
    jobs: list[HostJob],
    update: UpdateFn,
    chunk_numel: int,
    h2d: Streams,
    after: Events,
    queue: CpuAdamQueue | None = None,
) -> HostResult:
    """``start_host_update`` then ``land`` (see there)."""
    return start_host_update(jobs, chunk_numel, queue).land(update, h2d, after)
