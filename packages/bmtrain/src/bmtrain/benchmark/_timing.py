"""Timing of one collective over a range of message sizes, printed on rank 0."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import bmt_comm
import torch
from bmt_comm import Communicator

__all__ = ["Measurement", "default_sizes", "measure", "format_size", "buffer_dtype"]


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


def _elapsed(run: Callable[[], None], device: torch.device, iters: int) -> float:
    if device.type == "cuda":
        start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        start.record()  # type: ignore[no-untyped-call]
        for _ in range(iters):
            run()
        end.record()  # type: ignore[no-untyped-call]
        end.synchronize()  # type: ignore[no-untyped-call]
        return float(start.elapsed_time(end)) / 1000 / iters  # type: ignore[no-untyped-call]
    t0 = time.perf_counter()
    for _ in range(iters):
        run()
    return (time.perf_counter() - t0) / iters


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
    seconds = _elapsed(run, comm.device, iters)
    slowest = torch.tensor([seconds], dtype=torch.float64, device=comm.device)
    comm.all_reduce(slowest, "max")
    seconds = float(slowest.item())
    algbw = size_bytes / seconds / 1e9
    return Measurement(op, size_bytes, seconds, algbw, algbw * bus_factor)
