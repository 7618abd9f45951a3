"""Bandwidth timing of collectives: the one implementation, used by ``bmtrain.benchmark`` and by
``benchmarks/comm``.

- :func:`time_calls`: seconds per call, from CUDA events on GPUs (``perf_counter`` on CPU);
- :func:`slowest`: the largest of every rank's value (what a collective's time is);
- :func:`bandwidth`: algorithm and bus bandwidth (GB/s) as nccl-tests define them;
- :func:`measure`: the three together, for one collective at one size.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import bmt_comm
import torch
from bmt_comm import Communicator

__all__ = [
    "Measurement",
    "bandwidth",
    "buffer_dtype",
    "default_sizes",
    "format_size",
    "measure",
    "slowest",
    "time_calls",
]


@dataclass(frozen=True)
class Measurement:
    op: str
    size_bytes: int  # the larger side of the collective (all-gather output, reduce-scatter input)
    seconds: float  # mean over the timed iterations, slowest rank
    algbw_gbps: float  # size_bytes / seconds, in GB/s (1e9 bytes)
    busbw_gbps: float  # algbw scaled as nccl-tests do, comparable with the link's bandwidth


def default_sizes(device: torch.device) -> list[int]:
    """2**10 .. 2**32 bytes on GPUs (as BMTrain 1.0.1), 2**10 .. 2**24 on CPU (gloo)."""
    top = 32 if device.type == "cuda" else 24
    return [1 << e for e in range(10, top + 1)]


def buffer_dtype(device: torch.device) -> torch.dtype:
    return torch.float16 if device.type == "cuda" else torch.float32


def format_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:g} {unit}" if unit == "B" else f"{n:.0f} {unit}"
        n = n // 1024
    raise AssertionError("unreachable")


def time_calls(run: Callable[[], object], device: torch.device, iters: int, each: bool = False) -> list[float]:
    """Seconds per call of ``iters`` calls of ``run`` (enqueued on the current stream).

    ``each=False``: one number, the mean, from one pair of events around the loop (back-to-back
    calls); ``each=True``: one number per call, from events around each call (for a median).
    """
    if iters < 1:
        raise ValueError(f"iters must be at least 1, got {iters}")
    if device.type != "cuda":
        times = []
        t0 = time.perf_counter()
        for _ in range(iters):
            run()
            if each:
                t1 = time.perf_counter()
                times.append(t1 - t0)
                t0 = t1
        return times if each else [(time.perf_counter() - t0) / iters]
    pairs = iters if each else 1
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(pairs)]  # type: ignore[no-untyped-call]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(pairs)]  # type: ignore[no-untyped-call]
    if each:
        for start, end in zip(starts, ends, strict=True):
            start.record()  # type: ignore[no-untyped-call]
            run()
            end.record()  # type: ignore[no-untyped-call]
    else:
        starts[0].record()  # type: ignore[no-untyped-call]
        for _ in range(iters):
            run()
        ends[0].record()  # type: ignore[no-untyped-call]
    ends[-1].synchronize()  # type: ignore[no-untyped-call]
    per = 1 if each else iters
    return [float(s.elapsed_time(e)) / 1000 / per for s, e in zip(starts, ends, strict=True)]  # type: ignore[no-untyped-call]


def slowest(value: float, comm: Communicator) -> float:
    """The largest ``value`` over ``comm``'s ranks (collective: every rank calls it)."""
    t = torch.tensor([value], dtype=torch.float64, device=comm.device)
    comm.all_reduce(t, bmt_comm.ReduceOp.MAX)
    return float(t.item())


def bandwidth(size_bytes: int, seconds: float, bus_factor: float) -> tuple[float, float]:
    """(algorithm, bus) bandwidth in GB/s (1e9 bytes): ``size / time`` and that times
    ``bus_factor`` (``(n - 1) / n`` for all-gather and reduce-scatter, as in nccl-tests)."""
    algbw = size_bytes / seconds / 1e9
    return algbw, algbw * bus_factor


def measure(
    op: str,
    comm: Communicator,
    size_bytes: int,
    run: Callable[[], None],
    bus_factor: float,
    iters: int,
    warmup: int = 1,
) -> Measurement:
    """Time ``run`` (one collective) after ``warmup`` calls; every rank reports its slowest peer."""
    for _ in range(warmup):
        run()
    bmt_comm.synchronize(comm)
    seconds = slowest(time_calls(run, comm.device, iters)[0], comm)
    algbw, busbw = bandwidth(size_bytes, seconds, bus_factor)
    return Measurement(op, size_bytes, seconds, algbw, busbw)
