"""``CpuAdamQueue``: the C++ CPU Adam on a thread of its own, against direct calls of the kernel."""

from __future__ import annotations

import multiprocessing as mp
import queue
import threading
import time
from typing import Any

import pytest
import torch
from bmt_optim._host_update import HostJob, start_host_update, update_from_host
from bmt_optim._offload_pipeline import OffloadItem
from bmt_optim._torch_adam import TorchAdamArgs
from bmt_optim.cpu_adam import CpuAdamQueue, cpu_adam_update, native_module
from bmt_optim.kernels_adam import AdamScalars

from .native import check_native_built, requires_native

pytestmark = requires_native


@pytest.fixture(autouse=True)
def _native_built() -> None:
    check_native_built()


def scalars(step: int) -> AdamScalars:
    return AdamScalars.make(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, step=step, scale=2.0)


def problem(n: int, seed: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = [torch.randn(n, generator=g), torch.randn(n, generator=g) * 0.1, torch.rand(n, generator=g) * 0.01]
    return state, (torch.randn(n, generator=g) * 10).to(torch.bfloat16)


def copies(state: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.clone() for t in state]


def test_queued_updates_equal_direct_calls_bitwise() -> None:
    """Several jobs, with outputs and statistics, over threads: bit for bit the direct kernel's
    results, and two updates of the same tensors run in submission order (step 1 then step 2)."""
    q = CpuAdamQueue(num_threads=2)
    try:
        state, grad = problem(300_001, 0)
        ref = copies(state)
        out, ref_out = torch.empty(300_001, dtype=torch.bfloat16), torch.empty(300_001, dtype=torch.bfloat16)
        delta, ref_delta = torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
        tickets = [q.submit(*state, grad, out, scalars(1), delta), q.submit(*state, grad, out, scalars(2), delta)]
        for step in (1, 2):
            cpu_adam_update(*ref, grad, ref_out, scalars(step), num_threads=2, delta=ref_delta)
        seconds = [q.wait(t) for t in tickets]
        assert all(s > 0 for s in seconds), seconds
        for got, want in zip([*state, out, delta], [*ref, ref_out, ref_delta], strict=True):
            assert torch.equal(got, want)
        assert q.outstanding == 0
    finally:
        q.close()


def test_higher_priority_runs_first_then_submission_order() -> None:
    """While a long job runs, three updates of the same tensors are queued: step 3 at priority 0,
    then steps 1 and 2 at priority 5. They run 1, 2, 3 (the order is visible in the arithmetic:
    the result equals direct calls in that order, bit for bit)."""
    q = CpuAdamQueue(num_threads=1)
    try:
        long_state, long_grad = problem(1 << 24, 7)  # keeps the driver busy while the rest is queued
        state, grad = problem(50_000, 8)
        ref = copies(state)
        first = q.submit(*long_state, long_grad, None, scalars(1))
        tickets = [q.submit(*state, grad, None, scalars(3), priority=0),
                   q.submit(*state, grad, None, scalars(1), priority=5),
                   q.submit(*state, grad, None, scalars(2), priority=5)]
        assert not q.done(first), "the long job ended before the others were queued: the test proves nothing"
        for t in [first, *tickets]:
            q.wait(t)
        for step in (1, 2, 3):
            cpu_adam_update(*ref, grad, None, scalars(step), num_threads=1)
        for got, want in zip(state, ref, strict=True):
            assert torch.equal(got, want)
    finally:
        q.close()


def test_a_bad_job_is_refused_at_submit_and_wait_names_the_ticket() -> None:
    q = CpuAdamQueue(num_threads=1)
    try:
        state, grad = problem(100, 1)
        with pytest.raises(ValueError, match="exp_avg of 100 elements"):
            q.submit(state[0], state[1][:50], state[2], grad, None, scalars(1))
        with pytest.raises(ValueError, match="never submitted"):
            q.wait(7)
        t = q.submit(*state, grad, None, scalars(1))
        q.wait(t)
        with pytest.raises(ValueError, match="already waited for"):
            q.wait(t)
    finally:
        q.close()
    with pytest.raises(ValueError, match="num_threads must be >= 1, got 0"):
        CpuAdamQueue(num_threads=0)


def test_jobs_run_while_the_caller_holds_the_gil() -> None:
    """The point of the queue: queued jobs finish while this thread spins in Python, holding the
    GIL all along (a Python thread calling the kernel chunk by chunk would need it between chunks)."""
    q = CpuAdamQueue(num_threads=1)
    try:
        jobs = [problem(1 << 20, s) for s in range(4)]
        tickets = [q.submit(*st, g, None, scalars(1)) for st, g in jobs]
        deadline = time.perf_counter() + 30
        while not q.done(tickets[-1]) and time.perf_counter() < deadline:
            pass
        assert all(q.done(t) for t in tickets), "the queued jobs did not run while the GIL was held"
        assert q.completed == len(tickets)
        assert q.outstanding == len(tickets)  # run, not yet waited for
        for t in tickets:
            q.wait(t)
    finally:
        q.close()


def test_close_drops_queued_jobs_and_wait_says_so() -> None:
    q = CpuAdamQueue(num_threads=1)
    jobs = [problem(1 << 21, s) for s in range(6)]
    before = [copies(st) for st, _ in jobs]
    tickets = [q.submit(*st, g, None, scalars(1)) for st, g in jobs]
    q._queue.close()  # the running job finishes; the rest never run
    dropped = 0
    for t in tickets:
        try:
            q.wait(t)
        except RuntimeError as e:
            assert "dropped" in str(e)
            dropped += 1
    assert dropped >= 1
    untouched = sum(all(torch.equal(a, b) for a, b in zip(st, old, strict=True)) for (st, _), old in zip(jobs, before, strict=True))
    assert untouched == dropped  # a dropped job wrote nothing
    with pytest.raises(RuntimeError, match="closed"):
        q.submit(*jobs[0][0], jobs[0][1], None, scalars(1))


def _child_uses_parent_queue(q_parent: CpuAdamQueue, out: Any) -> None:
    state, grad = problem(10, 3)
    try:
        q_parent.submit(*state, grad, None, scalars(1))
        out.put("no error")
    except RuntimeError as e:
        out.put(str(e))
    fresh = CpuAdamQueue(num_threads=1)  # a queue of its own works
    fresh.wait(fresh.submit(*state, grad, None, scalars(1)))
    fresh.close()
    out.put("fresh ok")


def test_a_forked_child_is_told_to_make_its_own_queue() -> None:
    q = CpuAdamQueue(num_threads=1)
    state, grad = problem(1000, 2)
    q.wait(q.submit(*state, grad, None, scalars(1)))  # the driver thread exists
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    proc = ctx.Process(target=_child_uses_parent_queue, args=(q, out))
    proc.start()
    try:
        first, second = out.get(timeout=30), out.get(timeout=30)
    except queue.Empty:
        pytest.fail("the forked child hung on the parent's queue")
    finally:
        proc.join(timeout=30)
        proc.kill()
        q.close()
    assert "created in process" in first and "forked child" in first, first
    assert second == "fresh ok"


def _host_jobs(seed: int) -> list[HostJob]:
    """A bf16 parameter (the C++ kernel) and an fp32 one (torch's Adam), CPU targets."""
    jobs = []
    for n, dtype in ((70_000, torch.bfloat16), (5_000, torch.float32)):
        state, grad = problem(n, seed)
        grad = grad.to(dtype)
        s: Any = scalars(1) if dtype != torch.float32 else TorchAdamArgs(
            lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, step=1, scale=1.0, maximize=False, decoupled=True
        )
        target = torch.zeros(n, dtype=dtype)
        item = OffloadItem(target, grad, *state, s, torch.zeros(2, dtype=torch.float64))
        jobs.append(HostJob(item, grad, torch.empty(n, dtype=dtype), target))
    return jobs


def _update(master: torch.Tensor, m: torch.Tensor, v: torch.Tensor, g: torch.Tensor, out: torch.Tensor, s: Any, d: Any) -> None:
    from bmt_optim.adam_offload import _torch_update

    if isinstance(s, TorchAdamArgs):
        _torch_update(master, m, v, g, out, s, d)
    else:
        cpu_adam_update(master, m, v, g, out, s, num_threads=2, delta=d)


def test_host_update_through_the_queue_equals_the_direct_path() -> None:
    """``update_from_host`` with a queue (C++ chunks queued, fp32 chunks run by the caller) leaves
    the same targets, state and statistics as without, bit for bit."""
    direct, queued = _host_jobs(5), _host_jobs(5)
    update_from_host(direct, _update, 16_384, {}, {})
    q = CpuAdamQueue(num_threads=2)
    try:
        result = update_from_host(queued, _update, 16_384, {}, {}, q)
        assert result.cpu_seconds > 0 and q.outstanding == 0
    finally:
        q.close()
    for a, b in zip(direct, queued, strict=True):
        for x, y in zip([a.target, a.item.master, a.item.exp_avg, a.item.exp_avg_sq, a.item.delta],
                        [b.target, b.item.master, b.item.exp_avg, b.item.exp_avg_sq, b.item.delta], strict=True):
            assert torch.equal(x, y)


def test_a_failed_landing_waits_for_its_queued_chunks() -> None:
    """An error while landing (here: a chunk's update function raises) propagates only after every
    chunk queued for that update has finished, so none writes memory the caller then frees."""
    q = CpuAdamQueue(num_threads=1)
    try:
        jobs = _host_jobs(6)
        started = start_host_update(jobs, 8_192, q)
        assert q.outstanding > 0

        def failing(*args: Any) -> None:
            raise RuntimeError("update function failed")

        with pytest.raises(RuntimeError, match="update function failed"):
            started.land(failing, {}, {})
        assert q.outstanding == 0
    finally:
        q.close()


def test_waits_release_the_gil() -> None:
    """Another Python thread runs while this one waits for queued jobs."""
    q = CpuAdamQueue(num_threads=1)
    try:
        jobs = [problem(1 << 22, s) for s in range(6)]
        ticks: list[float] = []
        stop = threading.Event()

        def tick() -> None:
            while not stop.is_set():
                ticks.append(time.perf_counter())
                time.sleep(0.0005)

        th = threading.Thread(target=tick)
        th.start()
        tickets = [q.submit(*st, g, None, scalars(1)) for st, g in jobs]
        t0 = time.perf_counter()
        for t in tickets:
            q.wait(t)
        t1 = time.perf_counter()
        stop.set()
        th.join()
        during = [t for t in ticks if t0 < t < t1]
        assert len(during) >= 2, f"{len(during)} ticks in a {t1 - t0:.4f} s wait"
    finally:
        q.close()


def test_the_native_module_has_the_queue() -> None:
    mod = native_module()
    assert mod is not None and hasattr(mod, "AdamQueue")
