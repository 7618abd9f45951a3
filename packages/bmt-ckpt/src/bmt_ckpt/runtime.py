"""When a Block's full parameters are gathered, prefetched and released.

A Block's parameters live in a :class:`bmt_zero.flat_storage.FlatStorage`. Before the Block runs
(forward, or backward) its storage is gathered; the neighbour that runs next (the next Block in
forward, the previous one in backward) is prefetched, so its all-gather overlaps this Block's
compute; afterwards the storage is released (ZeRO-3) or kept until the backward (ZeRO-2).

One prefetch is outstanding at a time, process-wide: a gather queued for a Block is valid only for
the very next Block that runs. If another one runs instead, the prefetch is dropped (its memory
freed), so an unused or stale prefetch (e.g. across an optimizer step) is never consumed.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

import bmt_comm
import torch
from bmt_zero import BufferState, FlatStorage, ReduceHandle

__all__ = [
    "Phase",
    "ReleasePolicy",
    "SharedStorage",
    "BlockRuntime",
    "BackwardHold",
    "PendingBackward",
    "queue_final_callback",
    "track_reduce",
]


class Phase(Enum):
    FORWARD = "forward"
    BACKWARD = "backward"


class ReleasePolicy(Enum):
    """When a Block frees its gathered parameters (its ``zero_level``)."""

    AFTER_FORWARD = 3  # ZeRO-3: free after forward, gather again for backward
    AFTER_BACKWARD = 2  # ZeRO-2: keep from forward until the backward that needs them

    @classmethod
    def from_zero_level(cls, zero_level: int) -> ReleasePolicy:
        if zero_level not in (2, 3):
            raise ValueError(f"zero_level must be 2 or 3, got {zero_level!r}")
        return cls(zero_level)


@dataclass(eq=False)
class SharedStorage:
    """A flat storage and the counters of its users (Blocks made with ``reference`` share one)."""

    storage: FlatStorage
    pending_backward: int = 0  # ZeRO-2 graphs whose backward still needs the kept gather
    in_use: int = 0  # forwards/backwards running right now with the parameters bound full

    def release_if_idle(self) -> None:
        if self.pending_backward == 0 and self.in_use == 0:
            self.storage.release()


class _Prefetch:
    """The one gather queued ahead of its use (see the module docstring)."""

    def __init__(self) -> None:
        self._target: SharedStorage | None = None

    def claim(self, shared: SharedStorage | None) -> bool:
        """True if ``shared`` is the prefetched storage; any other prefetch is dropped."""
        target, self._target = self._target, None
        if target is shared:
            return shared is not None
        if target is not None:
            target.release_if_idle()
        return False

    def issue(self, shared: SharedStorage) -> None:
        self.claim(None)
        if shared.storage.state is BufferState.RELEASED:
            shared.storage.gather_async()
            self._target = shared


_PREFETCH = _Prefetch()


class _InFlightReduce:
    """The last Block's reduce-scatters, still running on the load stream while the next Block's
    backward computes. When a Block queues its own, the compute stream waits for the previous
    ones and their full gradient buffers are freed: at most two such buffers exist at a time,
    however far the CPU runs ahead of the GPU."""

    def __init__(self) -> None:
        self._handles: list[ReduceHandle] = []

    def replace(self, handles: list[ReduceHandle]) -> None:
        self.drain()
        self._handles = handles

    def drain(self) -> None:
        for handle in self._handles:
            handle.wait()
        self._handles = []


_REDUCE = _InFlightReduce()


def track_reduce(handles: list[ReduceHandle]) -> None:
    _REDUCE.replace(handles)


class _FinalCallback:
    """Once per backward pass: order the compute stream after the last reduce-scatters (issued on
    the load stream, so they overlap earlier Blocks' backward) and drop an unused prefetch."""

    def __init__(self) -> None:
        self.queued = False  # a callback is registered with the running backward pass

    def queue(self, device: torch.device) -> None:
        if self.queued:
            return
        self.queued = True
        engine: Any = torch.autograd.Variable._execution_engine  # type: ignore[attr-defined]
        engine.queue_callback(self._make(device))

    def _make(self, device: torch.device) -> Callable[[], None]:
        def run() -> None:
            self.queued = False
            _PREFETCH.claim(None)
            _REDUCE.drain()
            streams = bmt_comm.get_context().streams
            bmt_comm.wait_stream(bmt_comm.current_stream(device), streams.load)
            bmt_comm.wait_stream(streams.calc, streams.load)

        return run


_FINAL = _FinalCallback()


def queue_final_callback(device: torch.device) -> None:
    _FINAL.queue(device)


class BackwardHold:
    """A ZeRO-2 graph's claim on the kept gather: ends at its backward, or when the graph dies."""

    def __init__(self, shared: SharedStorage) -> None:
        self._shared: SharedStorage | None = shared
        shared.pending_backward += 1

    def done(self) -> None:
        shared, self._shared = self._shared, None
        if shared is not None:
            shared.pending_backward -= 1
            shared.release_if_idle()

    def __del__(self) -> None:
        self.done()


class PendingBackward:
    """A graph through a Block whose backward has not run yet: ends at that backward, or when the
    graph dies. A Block with none (frozen, or run outside autograd) is not prefetched in backward."""

    def __init__(self, runtime: BlockRuntime) -> None:
        self._runtime: BlockRuntime | None = runtime
        runtime.pending_graphs += 1

    def done(self) -> None:
        runtime, self._runtime = self._runtime, None
        if runtime is not None:
            runtime.pending_graphs -= 1

    def __del__(self) -> None:
        self.done()


class BlockRuntime:
    """How one Block uses its (maybe shared) storage, and which Blocks run before and after it."""

    def __init__(self, shared: SharedStorage, policy: ReleasePolicy) -> None:
        self.shared = shared
        self.policy = policy
        self.pending_graphs = 0  # graphs through this Block still to run backward (PendingBackward)
        self._pre: weakref.ref[BlockRuntime] | None = None
        self._next: weakref.ref[BlockRuntime] | None = None

    @property
    def storage(self) -> FlatStorage:
        return self.shared.storage

    def link_after(self, pre: BlockRuntime | None) -> None:
        """This Block runs right after ``pre`` in forward (and right before it in backward)."""
        old = self.pre_runtime()
        if old is not None and old.next_runtime() is self:
            old._next = None
        self._pre = None if pre is None else weakref.ref(pre)
        if pre is not None:
            pre._next = weakref.ref(self)

    def unlink_next(self) -> None:
        nxt = self.next_runtime()
        if nxt is not None and nxt.pre_runtime() is self:
            nxt._pre = None
        self._next = None

    def pre_runtime(self) -> BlockRuntime | None:
        return None if self._pre is None else self._pre()

    def next_runtime(self) -> BlockRuntime | None:
        return None if self._next is None else self._next()

    # --- one use: acquire, run, finish -------------------------------------------------
    def acquire(self, phase: Phase) -> None:
        """Gather (or take the prefetched gather), prefetch the neighbour, bind full params."""
        if phase is Phase.FORWARD:
            _FINAL.queued = False  # a forward runs outside any backward pass
        shared = self.shared
        prefetched = _PREFETCH.claim(shared)
        if phase is Phase.FORWARD and not prefetched:
            # a kept (ZeRO-2) gather may predate an optimizer step: a forward always gathers afresh
            self.storage.gather_async(force=True)
        self.storage.wait()  # backward: the kept gather, the prefetched one, or a new one
        neighbour = self.next_runtime() if phase is Phase.FORWARD else self.pre_runtime()
        if neighbour is not None and neighbour.shared is not shared:
            # in backward only a Block that will run backward too: never a frozen lower layer
            if phase is Phase.FORWARD or neighbour.pending_graphs > 0:
                _PREFETCH.issue(neighbour.shared)
        shared.in_use += 1

    def bind(self, grads: list[torch.Tensor | None] | None = None) -> None:
        self.storage.bind_full(grads)

    def finish(self) -> None:
        """Params back to their shards; free the gather unless a ZeRO-2 backward still needs it."""
        shared = self.shared
        self.storage.bind_shard()
        shared.in_use -= 1
        shared.release_if_idle()

    def hold_for_backward(self) -> BackwardHold | None:
        return BackwardHold(self.shared) if self.policy is ReleasePolicy.AFTER_BACKWARD else None
