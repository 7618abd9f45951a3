"""A watchdog for bmt's own NCCL communicators, as torch's ProcessGroupNCCL has one.

NCCL calls return once enqueued; a peer that never arrives leaves the kernel spinning and the
host blocked in its next synchronize, forever. After each collective an event is recorded on the
stream; one daemon thread polls the pending events, and while one is unfinished it asks NCCL for
an asynchronous error (``ncclCommGetAsyncError``). An error, or a deadline passed, aborts the
communicator (``ncclCommAbort``: the spinning kernel ends, the host's synchronize returns), prints
what failed to stderr, and raises :class:`~bmt_comm.timeouts.CollectiveError` in the main thread
and at every later call on that communicator.

The bookkeeping (:class:`Watchdog.poll`) is pure: events, clock and abort are passed in, so it is
tested without a GPU.
"""

from __future__ import annotations

import ctypes
import datetime
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from ..context import process_state
from ..timeouts import CollectiveError

__all__ = ["Pending", "Watched", "Watchdog", "get_watchdog", "raise_in_main_thread", "stop_watchdog"]

POLL_S = 0.1  # how often the thread looks: a deadline is met to within this


class _Event(Protocol):
    def query(self) -> bool: ...


class Watched(Protocol):
    """What the watchdog needs from a communicator."""

    @property
    def global_ranks(self) -> tuple[int, ...]: ...

    def async_error(self) -> str | None:
        """NCCL's asynchronous error as text, None while all is well."""
        ...

    def abort_for(self, error: CollectiveError) -> None:
        """``ncclCommAbort`` and remember ``error`` for every later call."""
        ...


@dataclass
class Pending:
    op: str
    comm: Watched
    event: _Event
    deadline: float  # on the watchdog's clock
    timeout: datetime.timedelta
    label: str = ""


class Watchdog:
    """Pending NCCL work per process; :meth:`poll` fails what is overdue or broken."""

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        on_failure: Callable[[CollectiveError], None] | None = None,
    ) -> None:
        self._clock = clock
        self._on_failure = on_failure
        self._pending: deque[Pending] = deque()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def watch(self, op: str, comm: Watched, event: _Event, timeout: datetime.timedelta, label: str = "") -> None:
        entry = Pending(op, comm, event, self._clock() + timeout.total_seconds(), timeout, label)
        with self._lock:
            self._pending.append(entry)

    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def forget(self, comm: Watched) -> None:
        """Drop ``comm``'s entries (it was closed or aborted)."""
        with self._lock:
            self._pending = deque(p for p in self._pending if p.comm is not comm)

    def poll(self) -> list[CollectiveError]:
        """Drop finished work; fail the communicators whose work is overdue or errored."""
        with self._lock:
            entries = list(self._pending)
        now = self._clock()
        failed: dict[int, CollectiveError] = {}
        done: set[int] = set()
        for entry in entries:
            if id(entry.comm) in failed:
                continue
            if entry.event.query():
                done.add(id(entry))
                continue
            cause = entry.comm.async_error()
            if cause is None and now < entry.deadline:
                continue
            if cause is None:
                cause = f"not finished after {entry.timeout.total_seconds():g}s (a peer never arrived)"
            error = CollectiveError(entry.op, entry.comm.global_ranks, entry.timeout, cause, None, entry.label)
            failed[id(entry.comm)] = error
            entry.comm.abort_for(error)
        with self._lock:
            self._pending = deque(
                p for p in self._pending if id(p) not in done and id(p.comm) not in failed
            )
        errors = list(failed.values())
        for error in errors:
            if self._on_failure is not None:
                self._on_failure(error)
        return errors

    # --- the thread ------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="bmt-nccl-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2 * POLL_S + 1)
        self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(POLL_S):
            try:
                self.poll()
            except Exception as exc:  # a watchdog that dies silently watches nothing: say so
                print(f"bmt NCCL watchdog: polling failed: {exc!r}", file=sys.stderr)


def raise_in_main_thread(error: CollectiveError) -> None:
    """Print ``error`` and raise it in the main thread at its next Python instruction (the
    abort has ended the kernel it was waiting on), as a subclass carrying the message."""
    print(f"bmt NCCL watchdog: {error}", file=sys.stderr, flush=True)
    main = threading.main_thread()
    if main is threading.current_thread() or main.ident is None:
        return
    args = error.__reduce__()[1]

    def _init(self: CollectiveError) -> None:
        CollectiveError.__init__(self, *args)

    # PyThreadState_SetAsyncExc takes a class, which it instantiates without arguments
    exc_type: type[Any] = type("CollectiveError", (CollectiveError,), {"__init__": _init, "__module__": __name__})
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(main.ident), ctypes.py_object(exc_type))


def get_watchdog() -> Watchdog:
    """The process's watchdog (kept in :class:`bmt_comm.context.ProcessState`), its thread
    started on first use."""
    state = process_state()
    with state.watchdog_lock:
        if state.watchdog is None:
            state.watchdog = Watchdog(on_failure=raise_in_main_thread)
        state.watchdog.start()
        return state.watchdog


def stop_watchdog() -> None:
    state = process_state()
    with state.watchdog_lock:
        if state.watchdog is not None:
            state.watchdog.stop()
            state.watchdog = None
