"""One background checkpoint writer per process (``save(non_blocking=True)``)."""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import bmt_comm

__all__ = ["EXIT_CODE", "submit", "wait"]

EXIT_CODE = 1  # a process whose last background save failed ends with this, as an uncaught error does

@dataclass
class _Saver:
    """The pending write and the error of the last finished one (a ``process_state`` slot)."""

    lock: threading.Lock = field(default_factory=threading.Lock)  # guards ``thread``
    thread: threading.Thread | None = None
    error: BaseException | None = None


def _saver() -> _Saver:
    return bmt_comm.process_state().slot(_Saver)


def _run(job: Callable[[], None]) -> None:
    try:
        job()
    except BaseException as ex:  # kept for the next wait(): a thread can't raise into the caller
        _saver().error = ex


def wait() -> BaseException | None:
    """Join the pending write, if any; return (and forget) the error it raised."""
    saver = _saver()
    with saver.lock:
        thread, saver.thread = saver.thread, None
    if thread is not None:
        thread.join()
    error, saver.error = saver.error, None
    return error


def submit(job: Callable[[], None]) -> None:
    """Run ``job`` in a new thread; the caller has waited for the previous one."""
    saver = _saver()
    thread = threading.Thread(target=_run, args=(job,), name="bmt-zero-save", daemon=False)
    with saver.lock:
        if saver.thread is not None:
            raise RuntimeError("a background save is still pending; wait() for it first")
        saver.thread = thread
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
