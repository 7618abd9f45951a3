"""The offload update when the gradients are already on the host (``overlap``/``delay_update``).

Chunk by chunk: the CPU Adam reads the host gradient and writes the new low-precision values
(into the gradient's own host memory when the dtypes match: each element is read before it is
written), and each chunk's host->device copy is queued on a side stream at once, so the copies
overlap the CPU work of the next chunks. The caller passes where the values go: the parameters
themselves (exact), or device staging tensors that the next step copies in (delayed).
"""

from __future__ import annotations

import time
from typing import NamedTuple

import torch

from ._offload_pipeline import OffloadItem, UpdateFn

__all__ = ["HostJob", "HostResult", "update_from_host"]


class HostJob(NamedTuple):
    item: OffloadItem  # master, moments, scalars (item.param and item.grad are not read)
    grad: torch.Tensor  # 1-D host gradient
    out: torch.Tensor  # 1-D host buffer of the target's dtype (may be ``grad`` itself)
    target: torch.Tensor  # 1-D: where the new values go (device or CPU)


class HostResult(NamedTuple):
    done: dict[torch.device, torch.cuda.Event]  # per device: after the last host->device copy
    cpu_seconds: float  # wall time inside the CPU Adam calls


def update_from_host(
    jobs: list[HostJob],
    update: UpdateFn,
    chunk_numel: int,
    h2d: dict[torch.device, torch.cuda.Stream],
    after: dict[torch.device, list[torch.cuda.Event]],
) -> HostResult:
    """Run the update; returns, per device, an event after the last host->device copy (the host
    buffers may be rewritten, and the targets read, once it has passed), and the time spent in
    the CPU Adam. ``h2d`` waits for
    the events ``after[device]`` first (the work that may still read the targets)."""
    waited: set[torch.device] = set()
    cpu = 0.0
    for job in jobs:
        it, n = job.item, job.target.numel()
        device = job.target.device
        cuda = device.type == "cuda"
        if cuda and device not in waited:
            waited.add(device)
            for event in after.get(device, ()):
                h2d[device].wait_event(event)
        for a in range(0, n, chunk_numel):
            b = min(n, a + chunk_numel)
            out = job.out[a:b]
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
