"""Start the training run on every local GPU (NCCL), or on 2 CPU processes (gloo).

Every option is checked here first (:mod:`.checks`), so a bad one fails in this process before
any worker starts. Under ``torchrun`` (``RANK`` and ``WORLD_SIZE`` set) each rank checks and then
runs in its own process. Otherwise this process starts one worker per rank, gives each the
environment ``torchrun`` would (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``)
and a rendezvous file in a temporary directory (no ports), and watches them: the first failing
worker stops the others and its traceback is reported (:class:`WorkerFailed`); SIGINT or SIGTERM
sent to this process stops every worker (SIGTERM, then SIGKILL after a grace period) and raises
:class:`Interrupted`. Workers ignore SIGINT (a terminal's Ctrl-C reaches them through this
process only) and die with this process even when it is killed (Linux). CPU workers are forked,
so they start at once with torch already imported; GPU workers are spawned, as CUDA requires.
"""

from __future__ import annotations

import ctypes
import multiprocessing.connection
import os
import pickle
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from types import FrameType
from typing import Any

import torch
import torch.multiprocessing as mp

from .checks import check_options, check_outputs
from .loop import RunResult, run
from .options import TrainOptions

__all__ = ["under_launcher", "default_nproc", "launch", "WorkerFailed", "Interrupted", "STOP_GRACE_S"]

STOP_GRACE_S = 5.0  # a worker still alive this long after SIGTERM is killed
_PR_SET_PDEATHSIG = 1  # prctl option: a signal sent to this process when its parent dies


class WorkerFailed(RuntimeError):
    """A worker exited with an error; the others were stopped."""

    def __init__(self, rank: int, exitcode: int, details: str) -> None:
        super().__init__(f"rank {rank} failed (exit code {exitcode})" + (f":\n{details}" if details else ""))
        self.rank, self.exitcode = rank, exitcode


class Interrupted(RuntimeError):
    """SIGINT or SIGTERM reached the launcher; every worker was stopped."""

    def __init__(self, signum: int, workers: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}: {workers} workers ended")
        self.signum = signum


def under_launcher() -> bool:
    """True when a launcher (torchrun, or ours) already made this process one rank of many."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def default_nproc() -> int:
    """Every visible GPU, else 2 CPU processes."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 2


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _limit_cpu_threads(local_world_size: int) -> None:
    if not torch.cuda.is_available():
        # ranks share the host's cores: one full pool of threads per rank would oversubscribe them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world_size))


def launch(opts: TrainOptions) -> RunResult:
    """Check ``opts``, then run them on ``opts.nproc`` local processes (in this one when that is
    1, or under torchrun). Raises :class:`~.options.OptionError` before anything starts."""
    if under_launcher():
        opts = check_options(opts, int(os.environ["WORLD_SIZE"]), _device())
        if os.environ["RANK"] == "0":  # the rank that writes the checkpoint and the metrics
            check_outputs(opts)
        _limit_cpu_threads(int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        return run(opts)
    nproc = opts.nproc or default_nproc()
    opts = check_options(opts, nproc, _device())
    check_outputs(opts)
    if nproc == 1:
        return run(opts)
    return _run_workers(opts, nproc)


@dataclass(frozen=True)
class _Paths:
    """Files the workers leave for the launcher in its temporary directory."""

    tmp: str

    @property
    def rendezvous(self) -> str:
        return os.path.join(self.tmp, "rendezvous")

    @property
    def result(self) -> str:
        return os.path.join(self.tmp, "result.pkl")

    def failure(self, rank: int) -> str:
        return os.path.join(self.tmp, f"failure-{rank}.txt")


def _worker(rank: int, nproc: int, opts: TrainOptions, paths: _Paths, parent: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the run through the launcher
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a forked worker inherits the launcher's handler
    _die_with_parent(parent)
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(nproc)
    )
    _limit_cpu_threads(nproc)
    try:
        result = run(opts)
    except BaseException:
        with open(paths.failure(rank), "w", encoding="utf-8") as f:
            f.write(traceback.format_exc())
        sys.stdout.flush()
        os._exit(1)  # no interpreter teardown: other ranks may still be blocked in a collective
    if rank == 0:
        with open(paths.result + ".tmp", "wb") as f:
            pickle.dump(result, f)
        os.replace(paths.result + ".tmp", paths.result)


def _die_with_parent(parent: int) -> None:
    """Ask Linux to kill this worker when the launcher dies, even by SIGKILL."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the launcher died before prctl took effect
        os._exit(1)


@contextmanager
def _stop_requests() -> Iterator[list[int]]:
    """SIGINT and SIGTERM append their number to the yielded list instead of raising."""
    received: list[int] = []

    def note(signum: int, frame: FrameType | None) -> None:
        received.append(signum)

    old = {s: signal.signal(s, note) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def _stop(procs: list[Any]) -> None:
    """SIGTERM every live worker, SIGKILL those still alive after ``STOP_GRACE_S``, reap all."""
    for p in procs:
        if p.exitcode is None:
            p.terminate()
    deadline = time.monotonic() + STOP_GRACE_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.exitcode is None:
            p.kill()
            p.join()


def _run_workers(opts: TrainOptions, nproc: int) -> RunResult:
    method = "spawn" if torch.cuda.is_available() else "fork"  # a forked child cannot use CUDA
    ctx: Any = mp.get_context(method)
    sys.stdout.flush()  # a forked worker would print this process's unflushed output again
    sys.stderr.flush()
    with tempfile.TemporaryDirectory(prefix="bmtrain-train-") as tmp, _stop_requests() as received:
        paths = _Paths(tmp)
        opts = replace(opts, init_method=f"file://{paths.rendezvous}")
        procs = [
            ctx.Process(target=_worker, args=(r, nproc, opts, paths, os.getpid()), name=f"bmtrain-train rank {r}")
            for r in range(nproc)
        ]
        started: list[Any] = []
        try:
            for p in procs:
                if received:
                    break
                p.start()
                started.append(p)
            failed = _watch(started, received)
        finally:
            _stop(started)
        if received:
            raise Interrupted(received[0], len(procs))
        if failed is not None:
            path = paths.failure(failed.rank)
            details = ""
            if os.path.exists(path):
                with open(path, encoding="utf-8") as f:
                    details = f.read()
            raise WorkerFailed(failed.rank, failed.exitcode, details)
        with open(paths.result, "rb") as f:
            result: RunResult = pickle.load(f)
    return result


@dataclass(frozen=True)
class _Failure:
    rank: int
    exitcode: int


def _watch(procs: list[Any], received: list[int]) -> _Failure | None:
    """Wait until every worker has exited (None), one has failed, or a stop signal came."""
    live = {p.sentinel: (rank, p) for rank, p in enumerate(procs)}
    while live and not received:
        for sentinel in multiprocessing.connection.wait(list(live), timeout=0.2):
            rank, p = live.pop(sentinel)  # type: ignore[call-overload]
            p.join()
            if p.exitcode != 0:
                return _Failure(rank, p.exitcode)
    return None
