"""The NCCL watchdog's bookkeeping (pure: fake events, clock and communicator), and on 2 GPUs a
stuck peer on bmt's own NCCL communicator."""

from __future__ import annotations

import datetime
import os
import time

import pytest
import torch
from bmt_comm.nccl.watchdog import Watchdog
from bmt_comm.timeouts import CollectiveError

from ..harness import run_distributed_outcomes


class _Event:
    def __init__(self) -> None:
        self.done = False

    def query(self) -> bool:
        return self.done


class _Comm:
    global_ranks = (0, 1)

    def __init__(self) -> None:
        self.error: str | None = None
        self.aborted: list[CollectiveError] = []

    def async_error(self) -> str | None:
        return self.error

    def abort_for(self, error: CollectiveError) -> None:
        self.aborted.append(error)


def _dog() -> tuple[Watchdog, list[float], list[CollectiveError]]:
    now = [0.0]
    seen: list[CollectiveError] = []
    return Watchdog(clock=lambda: now[0], on_failure=seen.append), now, seen


def test_finished_work_is_dropped_and_nothing_aborts() -> None:
    dog, now, seen = _dog()
    comm, event = _Comm(), _Event()
    dog.watch("all_reduce", comm, event, datetime.timedelta(seconds=10))
    assert dog.poll() == [] and dog.pending() == 1
    event.done = True
    now[0] = 100.0  # past the deadline, but finished: not a timeout
    assert dog.poll() == [] and dog.pending() == 0 and comm.aborted == [] and seen == []


def test_overdue_work_aborts_its_communicator_once() -> None:
    dog, now, seen = _dog()
    comm, other = _Comm(), _Comm()
    dog.watch("all_gather", comm, _Event(), datetime.timedelta(seconds=10), "zero")
    dog.watch("reduce_scatter", comm, _Event(), datetime.timedelta(seconds=10), "zero")
    dog.watch("broadcast", other, _Event(), datetime.timedelta(seconds=60), "tp")
    now[0] = 9.9
    assert dog.poll() == []
    now[0] = 10.0
    errors = dog.poll()
    assert len(errors) == 1 and len(comm.aborted) == 1 and other.aborted == []
    text = str(errors[0])
    assert text.startswith("all_gather on group zero (global ranks [0, 1]) did not complete (timeout 10s)")
    assert "not finished after 10s (a peer never arrived)" in text
    assert seen == errors and dog.pending() == 1  # the aborted comm's entries are gone, tp's stays


def test_an_async_error_aborts_before_the_deadline() -> None:
    dog, now, _ = _dog()
    comm = _Comm()
    dog.watch("send", comm, _Event(), datetime.timedelta(seconds=1800))
    comm.error = "NCCL asynchronous error: remote process exited or there was a network error"
    [err] = dog.poll()
    assert "remote process exited" in str(err) and comm.aborted == [err]


def test_the_thread_raises_in_the_main_thread() -> None:
    from bmt_comm.nccl.watchdog import raise_in_main_thread

    dog = Watchdog(on_failure=raise_in_main_thread)
    dog.watch("all_reduce", _Comm(), _Event(), datetime.timedelta(seconds=0.2), "world")
    dog.start()
    try:
        with pytest.raises(CollectiveError, match=r"all_reduce on group world .*\(timeout 0.2s\)"):
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:  # a host loop, as a synchronize that the abort ended
                time.sleep(0.01)
    finally:
        dog.stop()


def _nccl_peer_stuck() -> str:
    import bmt_comm

    ctx = bmt_comm.get_context()
    assert ctx.backend == "nccl"
    comm = ctx.comms.world
    t = torch.ones(4, device=ctx.device)
    comm.all_reduce(t)
    torch.cuda.synchronize()
    if ctx.rank == 1:
        time.sleep(120)
        os._exit(0)
    comm.all_reduce(t)
    torch.cuda.synchronize()  # spins until the watchdog aborts the communicator
    return "finished"


@pytest.mark.gpus(2)
def test_nccl_stuck_peer_fails_the_other_rank_with_a_named_error() -> None:
    outcomes = run_distributed_outcomes(
        _nccl_peer_stuck, 2, init_kwargs={"timeout": 10}, timeout=90, watch=[0], bmt_creates_group=True,
    )
    out = outcomes[0]
    assert out.status == "error", out
    assert "CollectiveError" in out.traceback and "all_reduce on group world" in out.traceback
    assert "not finished after 10s" in out.traceback and out.elapsed < 25
