"""One background checkpoint writer per process (``save(non_blocking=True)``)."""

from __future__ import annotations

import atexit
import sys
import threading
from collections.abc import Callable

__all__ = ["submit", "wait"]

_lock = threading.Lock()
_thread: threading.Thread | None = None
_error: BaseException | None = None


def _run(job: Callable[[], None]) -> None:
    global _error
    try:
        job()
    except BaseException as ex:  # kept for the next wait(): a thread can't raise into the caller
        _error = ex


def wait() -> BaseException | None:
    """Join the pending write, if any; return (and forget) the error it raised."""
    global _thread, _error
    with _lock:
        thread, _thread = _thread, None
    if thread is not None:
        thread.join()
    error, _error = _error, None
    return error


def submit(job: Callable[[], None]) -> None:
    """Run ``job`` in a new thread; the caller has waited for the previous one."""
    global _thread
    thread = threading.Thread(target=_run, args=(job,), name="bmt-zero-save", daemon=False)
    with _lock:
        if _thread is not None:
            raise RuntimeError("a background save is still pending; wait() for it first")
        _thread = thread
    thread.start()


def _wait_at_exit() -> None:
    error = wait()
    if error is not None:
        print(f"bmt_zero: the last non-blocking save failed: {error!r}", file=sys.stderr)


atexit.register(_wait_at_exit)
