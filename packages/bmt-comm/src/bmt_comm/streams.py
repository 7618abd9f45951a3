"""CUDA streams used by the ZeRO and parallel layers; every helper is a no-op on CPU."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

__all__ = ["Streams", "make_streams", "stream_context", "wait_stream", "current_stream", "record_stream"]


@dataclass(frozen=True)
class Streams:
    """Streams of one process. ``None`` everywhere on CPU, where work is synchronous."""

    calc: torch.cuda.Stream | None = None  # the user's stream at init: compute runs here
    load: torch.cuda.Stream | None = None  # high priority: ZeRO all-gather / reduce-scatter overlap compute
    tp_comm: torch.cuda.Stream | None = None  # high priority: tensor-parallel comm overlaps matmuls
    pp_comm: torch.cuda.Stream | None = None  # high priority: pipeline sends/recvs overlap stage compute
    barrier: torch.cuda.Stream | None = None  # synchronize(): its all-reduce must not queue behind compute
    load_event: torch.cuda.Event | None = None  # wait_loader(): marks the end of the last load


def make_streams(device: torch.device) -> Streams:
    if device.type != "cuda":
        return Streams()
    with torch.cuda.device(device):
        return Streams(
            calc=torch.cuda.current_stream(),
            load=torch.cuda.Stream(priority=-1),  # type: ignore[no-untyped-call]
            tp_comm=torch.cuda.Stream(priority=-1),  # type: ignore[no-untyped-call]
            pp_comm=torch.cuda.Stream(priority=-1),  # type: ignore[no-untyped-call]
            barrier=torch.cuda.Stream(),  # type: ignore[no-untyped-call]
            load_event=torch.cuda.Event(),  # type: ignore[no-untyped-call]
        )


def current_stream(device: torch.device) -> torch.cuda.Stream | None:
    return torch.cuda.current_stream(device) if device.type == "cuda" else None


@contextlib.contextmanager
def stream_context(stream: torch.cuda.Stream | None) -> Iterator[None]:
    """``torch.cuda.stream(stream)``, or nothing when ``stream`` is None (CPU)."""
    if stream is None:
        yield
        return
    with torch.cuda.stream(stream):
        yield


def wait_stream(waiter: torch.cuda.Stream | None, waitee: torch.cuda.Stream | None) -> None:
    """Make ``waiter`` wait for the work queued so far on ``waitee``."""
    if waiter is not None and waitee is not None and waiter != waitee:
        waiter.wait_stream(waitee)


def record_stream(tensor: torch.Tensor, stream: torch.cuda.Stream | None) -> None:
    """Tell the caching allocator ``tensor`` is in use on ``stream`` (no-op on CPU)."""
    if stream is not None and tensor.is_cuda:
        tensor.record_stream(stream)
