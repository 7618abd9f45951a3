"""``init_distributed``: process group, topology, communicators and streams."""

from __future__ import annotations

import atexit
import datetime
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch._C._distributed_c10d import HashStore, Store

from .arguments import check_init_arguments
from .communicator import Backend, Communicator
from .context import Communicators, DistContext, _set_context, get_context, is_initialized, process_state
from .streams import make_streams
from .timeouts import DEFAULT_TIMEOUT
from .topology import GroupKind, Topology
from .torch_communicator import TorchCommunicator

__all__ = ["init_distributed", "destroy", "LaunchEnv"]

@dataclass(frozen=True)
class LaunchEnv:
    """What torchrun exports; defaults describe a lone process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @classmethod
    def from_environ(cls) -> LaunchEnv:
        def read(name: str, default: int) -> int:
            raw = os.environ.get(name)
            if raw is None or raw == "":
                return default
            try:
                return int(raw)
            except ValueError:
                raise ValueError(f"environment variable {name} must be an integer, got {raw!r}") from None

        env = cls(
            rank=read("RANK", 0),
            world_size=read("WORLD_SIZE", 1),
            local_rank=read("LOCAL_RANK", 0),
            local_size=read("LOCAL_WORLD_SIZE", 1),
        )
        if not 0 <= env.rank < env.world_size:
            raise ValueError(f"RANK ({env.rank}) must be in [0, WORLD_SIZE={env.world_size})")
        return env


def _select_backend(device: torch.device) -> Backend:
    """NCCL through bmt's own binding on GPUs; BMT_COMM_BACKEND=torch forces torch.distributed."""
    choice = os.environ.get("BMT_COMM_BACKEND", "auto").lower()
    if choice not in ("auto", "nccl", "torch"):
        raise ValueError(f"BMT_COMM_BACKEND must be auto, nccl or torch, got {choice!r}")
    if device.type != "cuda":
        if choice == "nccl":
            raise RuntimeError("BMT_COMM_BACKEND=nccl needs CUDA, but no GPU is visible")
        return Backend.TORCH
    return Backend.TORCH if choice == "torch" else Backend.NCCL


def _ensure_default_group(
    env: LaunchEnv, init_method: str, device: torch.device, timeout: datetime.timedelta = DEFAULT_TIMEOUT
) -> bool:
    """Reuse torch's default group if the user made one, else create it. True if we created it."""
    if dist.is_initialized():
        return False
    # cpu:gloo serves objects and CPU tensors; cuda:nccl lets users run torch collectives next to bmt
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    if env.world_size == 1 and "MASTER_ADDR" not in os.environ and init_method == "env://":
        # a lone process needs no rendezvous (and no port)
        dist.init_process_group(backend, store=HashStore(), rank=0, world_size=1, timeout=timeout)
    else:
        if init_method == "env://":  # the reference's defaults, which torchrun would have exported
            os.environ.setdefault("MASTER_ADDR", "localhost")
            os.environ.setdefault("MASTER_PORT", "10010")
        dist.init_process_group(
            backend,
            init_method=init_method,
            rank=env.rank,
            world_size=env.world_size,
            timeout=timeout,
        )
    return True


def _default_store() -> Store | None:
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        return _get_default_store()
    except Exception:  # some backends have no store reachable
        return None


def _check_same_arguments(args: dict[str, float], topo: Topology) -> None:
    """Every rank must pass the same layout and seed: one object all-gather on the default group,
    before any group is made from a topology the ranks might not share (a hang or a crash there)."""
    if topo.world_size == 1:
        return
    everyone: list[Any] = [None] * topo.world_size
    dist.all_gather_object(everyone, args)
    first: dict[str, float] = everyone[0]
    for rank, theirs in enumerate(everyone):
        for key, value in theirs.items():
            if value != first[key]:
                hint = " (seed each rank differently with torch.manual_seed after init)" if key == "seed" else ""
                raise ValueError(
                    f"init_distributed() must get the same {key} on every rank, but rank 0 has "
                    f"{key}={first[key]} and rank {rank} has {key}={value}{hint}"
                )


def _distinct_rank_sets(topo: Topology) -> list[tuple[int, ...]]:
    """Every multi-rank group of every kind, once, in an order all ranks agree on."""
    rank_sets: list[tuple[int, ...]] = []
    for kind in GroupKind:
        for ranks in topo.all_groups(kind):
            if len(ranks) > 1 and ranks not in rank_sets:
                rank_sets.append(ranks)
    return rank_sets


def _wait_until_all_connected(object_groups: dict[tuple[int, ...], dist.ProcessGroup], topo: Topology) -> None:
    """Return only once every rank has finished making every group.

    A gloo group is usable on one rank before its peer has finished connecting to it; a rank
    that went on and tore its groups down (a short script, ``destroy()``, an early error) would
    then fail the peer's connection ("Connection closed by peer"). One world barrier after the
    last group is made holds each rank until all are connected.
    """
    if topo.world_size > 1:
        world = object_groups.get(tuple(range(topo.world_size)), dist.group.WORLD)
        dist.barrier(group=world)


def _object_groups(
    topo: Topology, device: torch.device, timeout: datetime.timedelta, reuse_world: bool
) -> dict[tuple[int, ...], dist.ProcessGroup]:
    """A gloo group per rank set: pickled objects and CPU tensors travel on it, never on NCCL.

    ``dist.new_group`` is collective over the world, so every rank creates every group. Each gets
    ``timeout``; the default group is reused for the world only when ``reuse_world`` (its timeout
    is ours, or none was asked for).
    """
    groups: dict[tuple[int, ...], dist.ProcessGroup] = {}
    world = tuple(range(topo.world_size))
    for ranks in _distinct_rank_sets(topo):
        if ranks == world and reuse_world and device.type == "cpu" and dist.get_backend() == "gloo":
            groups[ranks] = dist.group.WORLD  # type: ignore[assignment]
            continue
        pg = dist.new_group(list(ranks), backend="gloo", timeout=timeout)
        if topo.rank in ranks:
            groups[ranks] = pg
    return groups


def _build_communicators(
    topo: Topology,
    device: torch.device,
    backend: Backend,
    store: Store | None,
    object_groups: dict[tuple[int, ...], dist.ProcessGroup],
    timeout: datetime.timedelta = DEFAULT_TIMEOUT,
    reuse_world: bool = True,
    world_timeout: datetime.timedelta | None = None,
) -> Communicators:
    """One communicator per distinct rank set; kinds with the same members share it.

    Every rank walks every rank set in the same order: ``dist.new_group`` is collective over
    the world, and the NCCL store keys must match across the members of a group.
    """
    # a fresh key space per init (the one mechanism that keeps a re-init from reading the last
    # run's NCCL ids or failure reports): every rank counts its inits alike
    generation = process_state().next_generation()
    mine: dict[tuple[int, ...], Communicator] = {}
    for kind in GroupKind:
        ranks = topo.group_ranks(kind)
        if len(ranks) == 1:  # a group of one needs no transport: collectives are copies
            mine.setdefault(ranks, TorchCommunicator(None, ranks, 0, device))
    try:
        for index, ranks in enumerate(_distinct_rank_sets(topo)):
            comm = _transport(topo, ranks, f"bmt_nccl_uid/{generation}/{index}", device, backend, store,
                              object_groups, timeout, reuse_world, world_timeout, generation)
            if comm is not None:
                mine[ranks] = comm
    except BaseException:
        for comm in mine.values():  # the NCCL communicators made before the failure
            comm.close()
        raise
    return Communicators(**{kind.value: mine[topo.group_ranks(kind)] for kind in GroupKind})


def _transport(
    topo: Topology,
    ranks: tuple[int, ...],
    key: str,
    device: torch.device,
    backend: Backend,
    store: Store | None,
    object_groups: dict[tuple[int, ...], dist.ProcessGroup],
    timeout: datetime.timedelta = DEFAULT_TIMEOUT,
    reuse_world: bool = True,
    world_timeout: datetime.timedelta | None = None,
    generation: int = 0,
) -> Communicator | None:
    """This rank's communicator over ``ranks`` (None if not a member). Called by every rank."""
    member = topo.rank in ranks
    label = "/".join(kind.value for kind in GroupKind if topo.group_ranks(kind) == ranks) if member else ""
    if backend is Backend.NCCL:
        if not member:
            return None
        from .nccl import NcclCommunicator

        if store is None:
            raise RuntimeError("NCCL communicators need torch.distributed's default store")
        return NcclCommunicator.from_store(store, key, ranks, ranks.index(topo.rank), device,
                                           timeout=timeout, label=label)
    if device.type == "cpu":
        # shares the gloo group of objects; destroy() releases it
        if not member:
            return None
        gloo = object_groups[ranks]
        known = timeout if gloo is not dist.group.WORLD else world_timeout
        return TorchCommunicator(gloo, ranks, ranks.index(topo.rank), device, timeout=known, store=store,
                                 label=label, generation=str(generation))
    # torch transport on GPUs: the NCCL side of the default group; new_group is collective.
    # A default group without NCCL (gloo only) cannot carry CUDA tensors: make an NCCL group.
    world = reuse_world and len(ranks) == topo.world_size and "nccl" in str(dist.get_backend()).lower()
    pg = dist.group.WORLD if world else dist.new_group(list(ranks), backend="nccl", timeout=timeout)
    if not member:
        return None
    assert pg is not None  # WORLD exists once the default group does
    return TorchCommunicator(pg, ranks, ranks.index(topo.rank), device, owns_group=not world,
                             timeout=timeout if not world else world_timeout,
                             store=store, label=label, generation=str(generation))



def init_distributed(
    init_method: str = "env://",
    seed: int = 0,
    pipe_size: int = -1,
    num_micro_batches: int | None = None,
    tp_size: int = 1,
    timeout: float | datetime.timedelta | None = None,
) -> None:
    """Set up this process for BMTrain: process group, topology, communicators, streams, seeds.

    Reads RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE (and MASTER_ADDR/PORT) as torchrun sets
    them; with none set, a one-process world. An existing torch.distributed default group is
    reused. Every rank is seeded with the same ``seed``.

    ``timeout`` (seconds or a timedelta; else ``BMT_TIMEOUT`` seconds; else 1800 s) bounds every
    collective of every group bmt makes, and of the default group when bmt makes it: a
    collective past it fails on every rank with a ``bmt_comm.CollectiveError`` naming it.
    """
    if is_initialized():
        raise RuntimeError(
            "init_distributed() was already called in this process; call bmt_comm.destroy() "
            "first to re-initialize"
        )
    args = check_init_arguments(init_method, seed, pipe_size, num_micro_batches, tp_size, timeout)
    seed, pipe, tp, pipe_enabled = args.seed, args.pipe_size, args.tp_size, args.pipe_enabled
    env = LaunchEnv.from_environ()
    if dist.is_initialized():  # the user's group decides rank and world size
        if "WORLD_SIZE" in os.environ and dist.get_world_size() != env.world_size:
            raise RuntimeError(
                f"the existing torch.distributed group has world size {dist.get_world_size()} "
                f"but WORLD_SIZE is {env.world_size}"
            )
        env = LaunchEnv(dist.get_rank(), dist.get_world_size(), env.local_rank, env.local_size)
    topo = Topology(rank=env.rank, world_size=env.world_size, pipe_size=pipe, tp_size=tp)
    micros = args.num_micro_batches if args.num_micro_batches is not None else pipe

    if torch.cuda.is_available():
        device = torch.device("cuda", env.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    backend = _select_backend(device)
    owns = _ensure_default_group(env, args.init_method, device, args.timeout)
    # the user's default group keeps its own timeout: when one was asked for, bmt's world
    # communicator gets a group of its own instead of reusing the user's
    reuse_world = owns or not args.timeout_given
    world_timeout = args.timeout if owns else None
    object_groups: dict[tuple[int, ...], dist.ProcessGroup] = {}
    try:
        _check_same_arguments(
            {"pipe_size": pipe, "tp_size": tp, "num_micro_batches": micros, "seed": seed,
             "timeout": args.timeout.total_seconds()},
            topo,
        )
        store = _default_store()
        object_groups = _object_groups(topo, device, args.timeout, reuse_world)
        comms = _build_communicators(topo, device, backend, store, object_groups, args.timeout, reuse_world,
                                     world_timeout)
        _wait_until_all_connected(object_groups, topo)
    except BaseException:
        # leave the process as we found it, so the user can fix the cause and call us again
        _release_groups(object_groups, owns)
        raise

    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)

    _set_context(
        DistContext(
            rank=env.rank,
            world_size=env.world_size,
            local_rank=env.local_rank,
            local_size=env.local_size,
            device=device,
            topology=topo,
            comms=comms,
            streams=make_streams(device),
            backend=backend,
            pipe_enabled=pipe_enabled,
            micros=micros,
            seed=seed,
            timeout=args.timeout,
            owns_default_group=owns,
            store=store,
            object_groups=object_groups,
        )
    )


def _release_groups(object_groups: dict[tuple[int, ...], dist.ProcessGroup], owns_default: bool) -> None:
    if not dist.is_initialized():
        return
    for pg in object_groups.values():
        if pg is not dist.group.WORLD:
            dist.destroy_process_group(pg)
    if owns_default:
        dist.destroy_process_group()


# At exit, how long the main thread lets go of the GIL first (see _release_at_exit)
EXIT_GRACE_S = 0.05


def _release_at_exit() -> None:
    """At interpreter exit, release what ``init_distributed`` made and the script did not
    (1.0.1 scripts never call ``destroy``): gloo groups still alive while the process exits can
    abort it ("terminate called without an active exception", exit -6 under torchrun). NCCL
    communicators are aborted, not destroyed, as a peer may already be gone.

    First, after any init, the main thread sleeps ``EXIT_GRACE_S`` (letting go of the GIL): a
    gloo worker thread drops its finished collective's tensors just *after* the caller's wait
    returns, and dropping a tensor that Python let go of needs the GIL. A worker still waiting
    for it when the interpreter starts finalizing is ended by Python (``pthread_exit``) inside a
    ``noexcept`` frame, and the process aborts. Exit handlers run before finalization begins."""
    if process_state().generation > 0:
        time.sleep(EXIT_GRACE_S)
    if not is_initialized():
        return
    ctx = get_context()
    _set_context(None)
    try:
        for comm in ctx.comms.unique():
            abort = getattr(comm, "abort", None)
            abort() if callable(abort) else comm.close()
        _release_groups(ctx.object_groups, ctx.owns_default_group)
    except Exception as exc:  # the process is ending: say so, but let it end
        print(f"bmt_comm: releasing the process groups at exit failed: {exc!r}", file=sys.stderr)


# registered at import, before bmt_zero's wait for a background save, so it runs after that wait
atexit.register(_release_at_exit)


def destroy() -> None:
    """Release communicators and bmt's groups (and torch's default group if ``init_distributed``
    made it). Collective in effect: every rank should call it, then may call ``init_distributed``
    again."""
    ctx = get_context()
    _set_context(None)
    try:
        for comm in ctx.comms.unique():
            comm.close()
    finally:
        _release_groups(ctx.object_groups, ctx.owns_default_group)
