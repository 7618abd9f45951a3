"""Whether a tensor's kernels run through Triton or through the plain-torch fallback.

Triton ships with torch's CUDA wheels, so CUDA tensors use it whenever it imports. CPU tensors
use it only under ``TRITON_INTERPRET=1`` (Triton's interpreter), which is how CPU tests check the
kernels' arithmetic; otherwise CPU work goes to torch.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from dataclasses import dataclass
from enum import Enum

import bmt_comm
import torch

__all__ = ["Backend", "backend_for", "on_device", "triton_available", "triton_interpreting"]


class Backend(str, Enum):
    TRITON = "triton"  # a Triton kernel (compiled on CUDA, interpreted on CPU)
    TORCH = "torch"  # plain torch ops


@dataclass
class _Probe:
    """Whether Triton imports, found once per process (a ``process_state`` slot)."""

    available: bool | None = None


def triton_available() -> bool:
    """Triton imports (a broken install counts as absent: the torch fallback still works)."""
    probe = bmt_comm.process_state().slot(_Probe)
    if probe.available is None:
        probe.available = _probe_triton()
    return probe.available


def _probe_triton() -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "use torch"
        return False
    return True


def triton_interpreting() -> bool:
    """``TRITON_INTERPRET=1``: kernels are decorated as interpreted functions at import time."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def backend_for(t: torch.Tensor) -> Backend:
    if not triton_available():
        return Backend.TORCH
    if t.is_cuda:
        return Backend.TRITON
    if t.device.type == "cpu" and triton_interpreting():
        return Backend.TRITON
    return Backend.TORCH


def on_device(t: torch.Tensor) -> contextlib.AbstractContextManager[object]:
    """Triton launches on the current CUDA device: make it ``t``'s (nothing to do on CPU)."""
    if t.is_cuda:
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()
