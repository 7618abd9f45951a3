"""Collective timeouts: a dead or stuck rank makes every other rank fail, fast, with a named error."""

from __future__ import annotations

import datetime
import os
import time

import pytest
import torch

from ..harness import run_distributed, run_distributed_outcomes

TIMEOUT_S = 10
CPU = {"CUDA_VISIBLE_DEVICES": ""}


def _peer_fails(victim: int, how: str, kind: str) -> str:
    import bmt_comm

    ctx = bmt_comm.get_context()
    comm = ctx.comms.get(bmt_comm.GroupKind(kind))
    comm.all_reduce(torch.ones(4))  # every rank is up and connected
    if ctx.rank == victim:
        if how == "kill":
            os._exit(3)
        time.sleep(120)  # stuck (a hung data loader, a deadlock) and never arrives
    comm.all_reduce(torch.ones(4))
    return "finished"


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("how", ["kill", "stuck"])
@pytest.mark.parametrize("bmt_creates_group", [True, False], ids=["bmt-group", "user-group"])
def test_dead_or_stuck_rank_fails_every_other_rank_with_a_named_error(
    world_size: int, how: str, bmt_creates_group: bool
) -> None:
    victim = world_size - 1
    others = [r for r in range(world_size) if r != victim]
    outcomes = run_distributed_outcomes(
        _peer_fails, world_size, victim, how, "world",
        init_kwargs={"timeout": TIMEOUT_S}, env=CPU, timeout=60,
        bmt_creates_group=bmt_creates_group, watch=others,
    )
    for rank in others:
        out = outcomes[rank]
        assert out.status == "error", f"rank {rank}: {out}"
        assert "bmt_comm.timeouts.CollectiveError" in out.traceback, out.traceback
        assert "all_reduce on group world" in out.traceback and f"global ranks {list(range(world_size))}" in out.traceback
        assert f"timeout {TIMEOUT_S}s" in out.traceback
        assert out.elapsed < 20, f"rank {rank} took {out.elapsed:.1f}s to fail"
        if how == "stuck":  # every live rank reached the collective, so the stuck one is named
            assert "Timed out waiting" in out.traceback
            assert f"did not arrive or report this failure: [{victim}]" in out.traceback, out.traceback
    expected_victim = "exit" if how == "kill" else "hung"
    assert outcomes[victim].status == expected_victim


@pytest.mark.parametrize("how", ["kill", "stuck"])
def test_a_sub_group_names_itself(how: str) -> None:
    # tp_size=2 at world 4: tp_zero groups [0, 2] and [1, 3]; rank 3 fails, rank 1 (its peer) reports
    outcomes = run_distributed_outcomes(
        _peer_fails, 4, 3, how, "tp_zero",
        init_kwargs={"timeout": TIMEOUT_S, "tp_size": 2}, env=CPU, timeout=60, watch=[1],
    )
    err = outcomes[1]
    assert err.status == "error" and "all_reduce on group tp_zero/pp_tp_zero" in err.traceback, err
    assert "global ranks [1, 3]" in err.traceback and err.elapsed < 20
    if how == "stuck":
        assert "did not arrive or report this failure: [3]" in err.traceback


def _timeouts() -> tuple[float, float | None]:
    import bmt_comm

    ctx = bmt_comm.get_context()
    comm = ctx.comms.world
    assert isinstance(comm, bmt_comm.TorchCommunicator)
    return ctx.timeout.total_seconds(), None if comm.timeout is None else comm.timeout.total_seconds()


@pytest.mark.world_size(2)
def test_timeout_from_keyword_env_and_default() -> None:
    assert run_distributed(_timeouts, 2, init_kwargs={"timeout": datetime.timedelta(seconds=42)}, env=CPU) == [(42, 42)] * 2
    assert run_distributed(_timeouts, 2, init_kwargs={}, env={**CPU, "BMT_TIMEOUT": "17"}) == [(17, 17)] * 2
    # nothing asked: 1800 s, and the caller's group is reused with whatever timeout it has
    assert run_distributed(_timeouts, 2, init_kwargs={}, env=CPU) == [(1800, None)] * 2


def test_resolve_timeout_rules() -> None:
    from bmt_comm.timeouts import DEFAULT_TIMEOUT, resolve_timeout

    assert resolve_timeout(None, {}) == DEFAULT_TIMEOUT == datetime.timedelta(seconds=1800)
    assert resolve_timeout(None, {"BMT_TIMEOUT": "2.5"}) == datetime.timedelta(seconds=2.5)
    assert resolve_timeout(3, {"BMT_TIMEOUT": "9"}) == datetime.timedelta(seconds=3)  # the keyword wins
    assert resolve_timeout(datetime.timedelta(minutes=2), {}) == datetime.timedelta(seconds=120)
    with pytest.raises(ValueError, match=r"init_distributed\(timeout=...\) must be a positive number of seconds, got 0"):
        resolve_timeout(0, {})
    with pytest.raises(ValueError, match="must be positive"):
        resolve_timeout(datetime.timedelta(seconds=-1), {})
    with pytest.raises(TypeError, match=r"timeout=...\) must be seconds .* got str '10'"):
        resolve_timeout("10", {})
    with pytest.raises(ValueError, match="BMT_TIMEOUT must be a number of seconds, got 'ten'"):
        resolve_timeout(None, {"BMT_TIMEOUT": "ten"})
    with pytest.raises(ValueError, match="BMT_TIMEOUT must be a positive"):
        resolve_timeout(None, {"BMT_TIMEOUT": "-5"})


class _DictStore:
    def __init__(self) -> None:
        self.keys: dict[str, bytes] = {}

    def set(self, key: str, value: bytes) -> None:
        self.keys[key] = value

    def check(self, keys: list[str]) -> bool:
        return all(k in self.keys for k in keys)


def test_failure_report_names_the_members_that_never_reported() -> None:
    from bmt_comm.timeouts import FailureReport

    store = _DictStore()
    FailureReport(store, (0, 2, 5), seq=7).missing(2, grace=0)  # rank 2 failed first
    now = [0.0]

    def clock() -> float:
        return now[0]

    def sleep(s: float) -> None:
        now[0] += s

    assert FailureReport(store, (0, 2, 5), seq=7).missing(0, grace=1.0, clock=clock, sleep=sleep) == [5]
    assert now[0] >= 1.0  # it waited the grace for rank 5
    assert FailureReport(store, (0, 2, 5), seq=8).missing(0, grace=0, clock=clock, sleep=sleep) == [2, 5]

    class Broken:
        def set(self, key: str, value: bytes) -> None:
            raise RuntimeError("store host is gone")

    assert FailureReport(Broken(), (0, 1), seq=0).missing(0, grace=1) is None


def test_collective_error_message_and_pickling() -> None:
    import pickle

    from bmt_comm.timeouts import CollectiveError

    err = CollectiveError("reduce_scatter", (1, 3), datetime.timedelta(seconds=10), "Timed out waiting", [3], "zero")
    text = str(err)
    assert text.startswith("reduce_scatter on group zero (global ranks [1, 3]) did not complete (timeout 10s)")
    assert text.endswith("ranks that did not arrive or report this failure: [3]")
    assert str(pickle.loads(pickle.dumps(err))) == text
