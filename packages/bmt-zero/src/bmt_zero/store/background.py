"""One background checkpoint writer per process (``save(non_blocking=True)``)."""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
from collections.abc import Callable

__all__ = ["EXIT_CODE", "submit", "wait"]

EXIT_CODE = 1  # a process whose last background save failed ends with this, as an uncaught error does

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
    """Wait for the pending save; if it failed, say so and end the process with ``EXIT_CODE``
    (a lost checkpoint must not look like a finished run to the scheduler)."""
    error = wait()
    if error is None:
        return
    print(
        f"bmt_zero: the last non-blocking save failed, so this process exits with code {EXIT_CODE}: "
        f"{type(error).__name__}: {error}",
        file=sys.stderr,
    )
    # an atexit handler cannot change the exit status but by os._exit, which skips the handlers
    # registered before this module's: run the two that matter here first
    try:
        from bmt_comm.init import _release_at_exit

        _release_at_exit()  # bmt_comm's groups, as it would have at exit
        logging.shutdown()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # a closed stream: nothing more to say
                pass
        os._exit(EXIT_CODE)


atexit.register(_wait_at_exit)
