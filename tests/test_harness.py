"""The harness itself: results come back by rank, failures and hangs fail fast."""

from __future__ import annotations

import time

import pytest

from .harness import DistributedTestError, run_distributed


def _rank_and_world() -> tuple[int, int]:
    import bmt_comm

    return bmt_comm.rank(), bmt_comm.world_size()


def _raise_on_rank_1() -> None:
    import bmt_comm

    if bmt_comm.rank() == 1:
        raise ValueError("boom from rank one")
    bmt_comm.synchronize()  # rank 0 would wait here forever without the harness


def _hang_on_rank_0() -> None:
    import bmt_comm

    if bmt_comm.rank() == 0:
        time.sleep(600)


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_results_by_rank(spawn, world_size):
    assert spawn(_rank_and_world) == [(r, world_size) for r in range(world_size)]


def test_failing_rank_fails_fast_with_its_traceback():
    start = time.monotonic()
    with pytest.raises(DistributedTestError, match=r"(?s)rank 1 of 2 failed.*boom from rank one"):
        run_distributed(_raise_on_rank_1, 2, init_kwargs={})
    assert time.monotonic() - start < 60


def test_hung_rank_times_out():
    start = time.monotonic()
    with pytest.raises(DistributedTestError, match=r"timed out after 5s; ranks \[0\] never finished"):
        run_distributed(_hang_on_rank_0, 2, init_kwargs={}, timeout=5)
    assert time.monotonic() - start < 30
