"""The CPU Adam update used by the offload optimizer: the C++ kernel, or torch when it is missing.

The C++ extension ``bmt_optim._cpu_adam`` (built at install time by ``hatch_build.py`` when a
compiler exists) takes raw pointers; this module checks the tensors and hands them over. Without
the extension the same update runs as vectorised torch ops, and a warning says so once per process.
"""

from __future__ import annotations

import importlib
import os
import warnings
from dataclasses import dataclass
from enum import Enum
from types import ModuleType

import bmt_comm
import torch

from .kernels_adam import AdamScalars, adam_update_torch

__all__ = [
    "CpuAdamBackend",
    "CpuAdamQueue",
    "cpu_adam_update",
    "default_num_threads",
    "native_available",
    "native_error",
    "native_module",
    "warn_if_fallback",
]

_native: ModuleType | None
_native_error: str | None = None
try:
    _native = importlib.import_module("bmt_optim._cpu_adam")
except ImportError as exc:  # not built (no compiler at install time) or built for another Python
    _native = None
    _native_error = str(exc)


class CpuAdamBackend(str, Enum):
    NATIVE = "native"  # the C++ SIMD kernel
    TORCH = "torch"  # vectorised torch ops (always available)


class _Dtype(int, Enum):
    """Element-type codes understood by the C++ kernel."""

    F32 = 0
    F16 = 1
    BF16 = 2


Into = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # new master, exp_avg, exp_avg_sq (out of place)

_CODES = {torch.float32: int(_Dtype.F32), torch.float16: int(_Dtype.F16), torch.bfloat16: int(_Dtype.BF16)}
_FLOATS = tuple(_CODES)


@dataclass
class _FallbackWarning:
    """Whether the torch-fallback warning was issued (a ``process_state`` slot: once per process)."""

    issued: bool = False


def native_available() -> bool:
    return _native is not None


def native_error() -> str | None:
    """Why ``bmt_optim._cpu_adam`` did not import (the ImportError's text), or None when it did."""
    return _native_error


def native_module() -> ModuleType | None:
    """The C++ extension (``best_simd()``, ``simd()``, ``set_simd(name)``), or None."""
    return _native


def warn_if_fallback() -> None:
    """Warn (once per process) that the torch fallback will do the CPU Adam work."""
    record = bmt_comm.process_state().slot(_FallbackWarning)
    if _native is None and not record.issued:
        record.issued = True
        warnings.warn(
            "bmt_optim's C++ CPU Adam is not available (" + str(_native_error) + "); using a slower "
            "torch implementation. Reinstall bmt-optim with a C++ compiler present to build it.",
            RuntimeWarning,
            stacklevel=3,
        )


def default_num_threads() -> int:
    """CPUs this process may use, divided among the ranks of this host (at least 1)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    local = 1
    try:
        import bmt_comm

        if bmt_comm.is_initialized():
            local = bmt_comm.get_context().local_size
    except ImportError:
        pass
    if local == 1:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, cpus // max(1, local))


def _check(
    name: str, t: torch.Tensor, numel: int, dtypes: tuple[torch.dtype, ...], why: str = "as master"
) -> None:
    if not t.is_cpu:  # (not t.device.type: building the device object costs more than the rest)
        raise ValueError(f"CPU Adam expects {name} on the CPU, got a tensor on {t.device}")
    if not t.is_contiguous():
        raise ValueError(f"CPU Adam expects a contiguous {name} (stride {t.stride()})")
    if t.dtype not in dtypes:
        raise ValueError(f"CPU Adam expects {name} of dtype {' or '.join(map(str, dtypes))}, got {t.dtype}")
    if t.numel() != numel:
        raise ValueError(f"CPU Adam expects {name} of {numel} elements ({why}), got {t.numel()}")


def _native_args(
    master: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    grad: torch.Tensor,
    out: torch.Tensor | None,
    s: AdamScalars,
    threads: int,
    delta: torch.Tensor | None,
) -> tuple[int | float, ...]:
    """The C++ kernel's positional arguments (the tensors already checked)."""
    if threads < 1:
        raise ValueError(f"num_threads must be >= 1, got {threads}")
    return (
        master.data_ptr(),
        exp_avg.data_ptr(),
        exp_avg_sq.data_ptr(),
        grad.data_ptr(),
        _CODES[grad.dtype],
        0 if out is None else out.data_ptr(),
        _CODES[out.dtype] if out is not None else _CODES[torch.float32],
        master.numel(),
        s.decay,
        s.one_minus_beta1,
        s.beta2,
        s.one_minus_beta2,
        s.eps,
        s.step_size,
        s.bc2_sqrt,
        s.grad_mul,
        threads,
        0 if delta is None else delta.data_ptr(),
        s.inv_bc1,
        s.weight_decay,
    )


def _into_kwargs(into: Into | None) -> dict[str, int]:
    """The C++ kernel's out-of-place pointers (0: in place)."""
    ptrs = (0, 0, 0) if into is None else tuple(t.data_ptr() for t in into)
    return dict(zip(("master_out", "exp_avg_out", "exp_avg_sq_out"), ptrs, strict=True))


def _check_all(
    master: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    grad: torch.Tensor,
    out: torch.Tensor | None,
    delta: torch.Tensor | None,
    into: Into | None = None,
) -> None:
    n = master.numel()
    f32 = (torch.float32,)
    _check("master", master, n, f32)
    _check("exp_avg", exp_avg, n, f32)
    _check("exp_avg_sq", exp_avg_sq, n, f32)
    if into is not None:
        for name, t in zip(("master", "exp_avg", "exp_avg_sq"), into, strict=True):
            _check(f"the new {name} (into)", t, n, f32)
    _check("grad", grad, n, _FLOATS)
    if out is not None:
        _check("out", out, n, _FLOATS)
    if delta is not None:
        _check("delta", delta, 2, (torch.float64,), why="sum and sum of squares")


def cpu_adam_update(
    master: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    grad: torch.Tensor,
    out: torch.Tensor | None,
    s: AdamScalars,
    *,
    num_threads: int | None = None,
    backend: CpuAdamBackend | None = None,
    delta: torch.Tensor | None = None,
    into: Into | None = None,
) -> CpuAdamBackend:
    """Update CPU ``master``/moments (fp32) from ``grad`` (fp32/fp16/bf16); write ``out`` if given.

    ``backend`` None picks the C++ kernel when built; returns the backend that ran. ``delta``: a
    float64 CPU tensor of 2 elements to which the sum and the sum of squares of the update
    direction ``m_hat / (sqrt(v_hat) + eps) + weight_decay * master`` (the master before this
    update) are added (the offload optimizer's ``record_delta``). ``into``: the new master and
    moments go to these three tensors instead (out of place: the inputs are only read).
    """
    _check_all(master, exp_avg, exp_avg_sq, grad, out, delta, into)
    if backend is None:
        backend = CpuAdamBackend.NATIVE if _native is not None else CpuAdamBackend.TORCH
    if backend is CpuAdamBackend.TORCH:
        if into is not None:
            for dst, src in zip(into, (master, exp_avg, exp_avg_sq), strict=True):
                dst.copy_(src)
            master, exp_avg, exp_avg_sq = into
        adam_update_torch(master, exp_avg, exp_avg_sq, grad, out, s, delta)
        return backend
    if _native is None:
        raise RuntimeError(f"the C++ CPU Adam is not available: {_native_error}")
    threads = num_threads if num_threads is not None else default_num_threads()
    _native.adam_step(*_native_args(master, exp_avg, exp_avg_sq, grad, out, s, threads, delta), **_into_kwargs(into))
    return backend


class CpuAdamQueue:
    """C++ CPU Adam updates run in submission order on a thread that never holds the GIL.

    ``submit`` checks the tensors as ``cpu_adam_update`` does, queues the update and returns a
    ticket (with ``priority``: queued jobs run the highest first, then in submission order); ``wait(ticket)`` blocks (GIL released) until it has run and returns its seconds, or
    raises the error it raised. The queue keeps the tensors of each job alive until it is waited
    for. Jobs run back to back: unlike a Python thread calling the kernel chunk by chunk, no job
    waits for the GIL between chunks while the main thread runs a forward or backward.
    ``close()`` (also at garbage collection) drops what has not started and joins the thread.
    """

    def __init__(self, num_threads: int | None = None) -> None:
        if _native is None:
            raise RuntimeError(f"CpuAdamQueue needs the C++ CPU Adam, which is not available: {_native_error}")
        threads = num_threads if num_threads is not None else default_num_threads()
        if threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {threads}")
        self.num_threads = threads
        self._queue = _native.AdamQueue()
        self._alive: dict[int, tuple[torch.Tensor | None, ...]] = {}  # ticket -> the job's tensors

    def submit(
        self,
        master: torch.Tensor,
        exp_avg: torch.Tensor,
        exp_avg_sq: torch.Tensor,
        grad: torch.Tensor,
        out: torch.Tensor | None,
        s: AdamScalars,
        delta: torch.Tensor | None = None,
        priority: int = 0,
        into: Into | None = None,
    ) -> int:
        """Queue one update; queued jobs run the highest ``priority`` first, then in submission
        order (``into``: out of place, as ``cpu_adam_update``)."""
        _check_all(master, exp_avg, exp_avg_sq, grad, out, delta, into)
        args = _native_args(master, exp_avg, exp_avg_sq, grad, out, s, self.num_threads, delta)
        ticket = int(self._queue.submit(*args, priority=priority, **_into_kwargs(into)))
        self._alive[ticket] = (master, exp_avg, exp_avg_sq, grad, out, delta, *(into or ()))
        return ticket

    def wait(self, ticket: int) -> float:
        try:
            return float(self._queue.wait(ticket))
        finally:
            self._alive.pop(ticket, None)

    def settle(self, tickets: list[int]) -> None:
        """Wait for ``tickets`` (those not waited for yet), ignoring their errors: an error path's
        cleanup, after which none of those jobs writes memory the caller is about to release."""
        for ticket in tickets:
            if ticket in self._alive:
                try:
                    self.wait(ticket)
                except RuntimeError:
                    pass

    @property
    def outstanding(self) -> int:
        """Jobs submitted and not yet waited for."""
        return int(self._queue.outstanding())

    def done(self, ticket: int) -> bool:
        """Whether job ``ticket`` has run (or was dropped by ``close``)."""
        return bool(self._queue.done(ticket))

    @property
    def completed(self) -> int:
        """Jobs run so far."""
        return int(self._queue.completed())

    def close(self) -> None:
        queue = getattr(self, "_queue", None)
        if queue is not None:
            queue.close()  # before the tensors go: the running job may still write them
        self._alive = {}

    def __del__(self) -> None:
        self.close()
