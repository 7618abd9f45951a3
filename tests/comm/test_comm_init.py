"""``init_distributed`` / ``destroy``: a lone process, reuse of the user's torch group, seeding,
re-initialisation, the reference's ``config`` keys, and errors before init."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from bmt_comm.init import LaunchEnv

# the keys of BMTrain 1.0.1's config after init (section 3)
CONFIG_KEYS = {
    "initialized", "rank", "world_size", "local_rank", "local_size", "pipe_size", "pipe_enabled",
    "tp_size", "tp_rank", "tp_zero_size", "tp_zero_rank", "zero_size", "zero_rank", "topology",
    "comm", "zero_comm", "tp_comm", "tp_zero_comm", "pipe_comm", "pp_zero_comm", "micros",
    "pp_tp_zero_comm", "calc_stream", "load_stream", "tp_comm_stream", "pp_comm_stream",
    "barrier_stream", "load_event", "save_param_to_cpu",
}
CONFIG_BEFORE_INIT = {"rank": 0, "local_rank": 0, "world_size": 1, "initialized": False}
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def check_uninitialized_errors() -> None:
    """Every API that needs the process group says to call init_distributed first."""
    import bmt_comm

    assert not bmt_comm.is_initialized()
    assert dict(bmt_comm.config) == CONFIG_BEFORE_INIT
    assert (bmt_comm.rank(), bmt_comm.world_size()) == (0, 1)
    x = torch.ones(4)
    calls = {
        "get_context": bmt_comm.get_context,
        "all_gather": lambda: bmt_comm.all_gather(x),
        "all_reduce": lambda: bmt_comm.all_reduce(x),
        "reduce_scatter": lambda: bmt_comm.reduce_scatter(x),
        "broadcast": lambda: bmt_comm.broadcast(x, 0),
        "synchronize": bmt_comm.synchronize,
        "wait_loader": bmt_comm.wait_loader,
        "sum_loss": lambda: bmt_comm.sum_loss(x),
        "gather_result": lambda: bmt_comm.gather_result(x),
        "broadcast_object": lambda: bmt_comm.broadcast_object({"a": 1}),
        "allgather_objects": lambda: bmt_comm.allgather_objects(1),
        "destroy": bmt_comm.destroy,
        "set save_param_to_cpu": lambda: bmt_comm.config.__setitem__("save_param_to_cpu", False),
    }
    for name, call in calls.items():
        with pytest.raises(RuntimeError, match=r"not initialized: call bmt.init_distributed\(\)"):
            call()
            raise AssertionError(f"{name} ran before init_distributed")
    with pytest.raises(KeyError, match=r"config has no key 'comm' before init_distributed\(\)"):
        bmt_comm.config["comm"]


LONE_PROCESS = textwrap.dedent(
    """
    import os, sys, tempfile
    import torch, torch.distributed as dist
    import bmt_comm
    from tests.comm.test_comm_init import CONFIG_KEYS, check_uninitialized_errors

    check_uninitialized_errors()
    bmt_comm.init_distributed()
    ctx = bmt_comm.get_context()
    assert dist.is_initialized() and ctx.owns_default_group
    assert (ctx.rank, ctx.world_size, bmt_comm.rank(), bmt_comm.world_size()) == (0, 1, 0, 1)
    assert set(CONFIG_KEYS) <= set(bmt_comm.config), set(CONFIG_KEYS) - set(bmt_comm.config)
    assert "MASTER_ADDR" not in os.environ and "MASTER_PORT" not in os.environ  # no rendezvous, no env writes
    t = torch.arange(3.0)
    assert torch.equal(bmt_comm.all_reduce(t, "avg"), t)
    assert torch.equal(bmt_comm.all_gather(t), t[None])
    assert torch.equal(bmt_comm.gather_result(t), t)
    assert bmt_comm.broadcast_object({"k": 1}) == {"k": 1} and bmt_comm.allgather_objects(5) == [5]
    bmt_comm.synchronize()
    try:
        bmt_comm.init_distributed()
        raise AssertionError("a second init_distributed did not raise")
    except RuntimeError as e:
        assert "already called" in str(e), e
    bmt_comm.destroy()
    assert not dist.is_initialized()  # we made the default group, so destroy() removed it
    check_uninitialized_errors()
    # again, through a file:// rendezvous and with pipelining switched on at size 1
    with tempfile.TemporaryDirectory() as tmp:
        bmt_comm.init_distributed(init_method=f"file://{tmp}/store", pipe_size=1)
        assert bmt_comm.config["pipe_enabled"] and bmt_comm.config["pipe_size"] == 1
        assert torch.equal(bmt_comm.sum_loss(torch.tensor(2.5)), torch.tensor(2.5))
        bmt_comm.destroy()
    assert not dist.is_initialized()
    print("LONE PROCESS OK")
    """
)


def test_lone_process_without_launch_env():
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env["PYTHONPATH"] = os.pathsep.join([repo, env.get("PYTHONPATH", "")])
    env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU path, also on a GPU machine
    proc = subprocess.run(
        [sys.executable, "-c", LONE_PROCESS], env=env, capture_output=True, text=True, timeout=120, cwd=repo
    )
    assert proc.returncode == 0, proc.stderr
    assert "LONE PROCESS OK" in proc.stdout


def test_launch_env_parsing(monkeypatch):
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    assert LaunchEnv.from_environ() == LaunchEnv(rank=0, world_size=1, local_rank=0, local_size=1)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert LaunchEnv.from_environ() == LaunchEnv(rank=3, world_size=8, local_rank=1, local_size=2)
    monkeypatch.setenv("RANK", "8")
    with pytest.raises(ValueError, match=r"RANK \(8\) must be in \[0, WORLD_SIZE=8\)"):
        LaunchEnv.from_environ()
    monkeypatch.setenv("RANK", "one")
    with pytest.raises(ValueError, match=r"environment variable RANK must be an integer, got 'one'"):
        LaunchEnv.from_environ()


def _draws() -> tuple[list[float], float, float]:
    return torch.rand(3).tolist(), random.random(), float(np.random.rand())


def _check_init(expected_draws: tuple[list[float], float, float]) -> tuple[list[float], float, float]:
    import bmt_comm
    import torch.distributed as dist

    ctx = bmt_comm.get_context()
    n, r = dist.get_world_size(), dist.get_rank()
    # the harness made the default group: bmt reuses it and leaves it usable
    assert not ctx.owns_default_group
    assert (ctx.rank, ctx.world_size) == (r, n)
    t = torch.tensor([float(r)])
    dist.all_reduce(t)
    assert t.item() == n * (n - 1) / 2

    cfg = bmt_comm.config
    assert CONFIG_KEYS <= set(cfg), CONFIG_KEYS - set(cfg)
    assert cfg["initialized"] is True
    assert (cfg["rank"], cfg["world_size"]) == (bmt_comm.rank(), bmt_comm.world_size()) == (r, n)
    assert (cfg["local_rank"], cfg["local_size"]) == (r, n)  # the harness exports LOCAL_RANK=rank
    assert (cfg["pipe_size"], cfg["pipe_enabled"], cfg["micros"]) == (1, False, 1)
    assert (cfg["tp_size"], cfg["tp_rank"], cfg["tp_zero_size"], cfg["tp_zero_rank"]) == (1, 0, n, r)
    assert (cfg["zero_size"], cfg["zero_rank"]) == (n, r)
    assert cfg["comm"] is cfg["zero_comm"] is ctx.comms.world
    assert cfg["comm"].size == n and cfg["tp_comm"].size == 1 and cfg["pipe_comm"].size == 1
    assert cfg["topology"].rank == r
    streams = ("calc_stream", "load_stream", "tp_comm_stream", "pp_comm_stream", "barrier_stream", "load_event")
    assert all(cfg[k] is None for k in streams)  # CPU: no streams
    assert cfg["save_param_to_cpu"] is True
    cfg["save_param_to_cpu"] = False
    assert cfg["save_param_to_cpu"] is False and ctx.settings.save_param_to_cpu is False
    with pytest.raises(KeyError, match=r"config\['rank'\] is read-only"):
        cfg["rank"] = 5
    with pytest.raises(KeyError, match=r"config has no key 'no_such_key' after init_distributed\(\)"):
        cfg["no_such_key"]

    with pytest.raises(RuntimeError, match=r"init_distributed\(\) was already called in this process"):
        bmt_comm.init_distributed()

    # destroy() keeps the user's group; everything else is back to "not initialized"
    world = ctx.comms.world
    bmt_comm.destroy()
    assert dist.is_initialized()
    if n > 1:  # a communicator kept past destroy() says so instead of using a released group
        with pytest.raises(RuntimeError, match=r"was closed \(bmt_comm.destroy\(\)\)"):
            world.all_reduce(torch.zeros(1))
    dist.barrier()
    check_uninitialized_errors()

    # same seed on every rank, whatever each rank's generators held before
    torch.manual_seed(100 + r)
    random.seed(100 + r)
    np.random.seed(100 + r)
    bmt_comm.init_distributed(seed=1234)
    draws = _draws()
    assert draws == expected_draws, (draws, expected_draws)
    bmt_comm.destroy()

    # bad arguments leave the process uninitialized and ready for a good call
    with pytest.raises(ValueError, match=rf"world_size \({n}\) must be divisible by pipe_size \(3\) \* tp_size \(1\)"):
        bmt_comm.init_distributed(pipe_size=3)  # n is 1, 2 or 4
    with pytest.raises(ValueError, match=r"num_micro_batches=...\) must be >= 1 \(or None/0 for one per stage\), got -1"):
        bmt_comm.init_distributed(num_micro_batches=-1)  # 0 means one per stage, as in 1.0.1
    os.environ["WORLD_SIZE"] = str(n + 1)
    try:
        with pytest.raises(RuntimeError, match=rf"group has world size {n} but WORLD_SIZE is {n + 1}"):
            bmt_comm.init_distributed()
    finally:
        os.environ["WORLD_SIZE"] = str(n)
    if n > 1:  # ranks that disagree all raise, naming the argument and a differing rank
        last = r == n - 1
        with pytest.raises(ValueError, match=rf"same seed on every rank, but rank 0 has seed=0 and rank {n - 1} has seed=5"):
            bmt_comm.init_distributed(seed=5 if last else 0)
        with pytest.raises(ValueError, match=rf"same tp_size on every rank, but rank 0 has tp_size=1 and rank {n - 1} has tp_size=2"):
            bmt_comm.init_distributed(tp_size=2 if last else 1)
    assert not bmt_comm.is_initialized()

    # re-init with another layout: new groups, and they work
    tp = 2 if n % 2 == 0 else 1
    bmt_comm.init_distributed(tp_size=tp, pipe_size=1, num_micro_batches=3)
    ctx = bmt_comm.get_context()
    assert (ctx.topology.tp_size, ctx.comms.tp.size, ctx.micros, ctx.pipe_enabled) == (tp, tp, 3, True)
    t = torch.tensor([1 << r])
    ctx.comms.tp.all_reduce(t)
    assert t.item() == sum(1 << m for m in ctx.comms.tp.global_ranks)
    assert bmt_comm.allgather_objects(r, ctx.comms.tp) == list(ctx.comms.tp.global_ranks)
    bmt_comm.synchronize()
    return draws


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_init_reuse_seed_reinit(spawn, world_size):
    state = (torch.get_rng_state(), random.getstate(), np.random.get_state())
    try:
        torch.manual_seed(1234)
        random.seed(1234)
        np.random.seed(1234)
        expected = _draws()
    finally:
        torch.set_rng_state(state[0])
        random.setstate(state[1])
        np.random.set_state(state[2])
    draws = spawn(_check_init, expected)
    assert draws == [expected] * world_size



def _released_at_exit() -> bool:
    import bmt_comm
    import torch.distributed as dist
    from bmt_comm.init import _release_at_exit

    assert bmt_comm.is_initialized()
    _release_at_exit()  # what the interpreter runs at exit when the script never called destroy()
    _release_at_exit()  # and nothing more when it did
    return not bmt_comm.is_initialized() and dist.is_initialized()  # the harness's own group stays


@pytest.mark.world_size(2)
def test_groups_are_released_at_exit(spawn):
    assert spawn(_released_at_exit) == [True, True]


def test_lone_process_releases_its_default_group_at_exit():
    code = (
        "import torch.distributed as dist, bmt_comm\n"
        "from bmt_comm.init import _release_at_exit\n"
        "bmt_comm.init_distributed()\n"
        "assert dist.is_initialized()\n"
        "_release_at_exit()\n"
        "assert not dist.is_initialized() and not bmt_comm.is_initialized()\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]



def _init_with_one_slow_rank(slow: int, delay: float) -> tuple[float, float]:
    import time

    import bmt_comm
    import bmt_comm.init as init

    bmt_comm.destroy()
    import torch.distributed as dist

    if dist.get_rank() == slow:  # this rank is still making its communicators when the others are done
        build = init._build_communicators

        def slow_build(*args: object, **kwargs: object) -> object:
            time.sleep(delay)
            return build(*args, **kwargs)  # type: ignore[arg-type]

        init._build_communicators = slow_build  # type: ignore[assignment]
    started = time.time()
    # a timeout other than the harness group's: bmt makes gloo groups of its own
    bmt_comm.init_distributed(timeout=42, tp_size=2)
    return started, time.time()


@pytest.mark.world_size(4)
def test_init_returns_only_once_every_rank_is_connected(spawn):
    # A gloo group is usable on one rank before its peer has connected. Before init's closing
    # barrier, a rank that returned and then left (a short script, a harness worker) made its
    # still-connecting peer fail with "Gloo connectFullMesh failed ... Connection closed by peer".
    delay = 1.5
    times = spawn(_init_with_one_slow_rank, 3, delay)
    slow_started = times[3][0]
    for rank in range(3):
        assert times[rank][1] >= slow_started + delay, f"rank {rank} returned before rank 3 had connected: {times}"
