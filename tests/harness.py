"""Multi-process test harness: N ranks on gloo, a FileStore in a temp dir, no fixed ports.

Ranks are forked from a forkserver that has imported torch once, so a run costs a fork, not an
interpreter start. The first rank that raises fails the run: the others are killed and the
failing rank's traceback is shown. A run that does not finish in ``timeout`` seconds (a hung
collective) is killed and reported with the ranks still missing.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import pickle
import queue
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

PG_TIMEOUT_S = 60  # a collective waiting longer than this raises inside the rank
RUN_TIMEOUT_S = 120  # the whole run, ranks' start included

_CTX: Any = None


def _context() -> Any:
    global _CTX
    if _CTX is None:
        _CTX = mp.get_context("forkserver")
        # imported once in the server, not in every rank (DTensor alone costs seconds per rank)
        _CTX.set_forkserver_preload(
            [
                "torch",
                "torch.distributed",
                "torch.distributed.tensor",
                "torch.testing",
                "torch._dynamo",  # any torch optimizer imports it: seconds per rank otherwise
                "bmt_comm",
                "bmt_zero",
                "bmt_ckpt",
                "bmt_optim",
                # tests/hf: seconds per rank otherwise; the forkserver skips them when transformers is absent
                "transformers.models.llama.modeling_llama",
                "transformers.models.qwen2.modeling_qwen2",
                "transformers.models.gpt2.modeling_gpt2",
            ]
        )
    return _CTX


def _worker(
    rank: int,
    world_size: int,
    store_path: str,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    init_kwargs: Mapping[str, Any] | None,
    env: dict[str, str],
    results: Any,
    bmt_creates_group: bool = False,
) -> None:
    try:
        os.environ.update(env)
        os.environ.update(
            RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size)
        )
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)  # N ranks share 2 cores: oversubscription slows every collective
        import bmt_comm

        if bmt_creates_group:  # init_distributed makes the default group, with its own timeout
            bmt_comm.init_distributed(init_method=f"file://{store_path}", **(init_kwargs or {}))
        else:
            store = dist.FileStore(store_path, world_size)
            # with GPUs the default group also carries CUDA tensors (torch transport, user interop)
            backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
            dist.init_process_group(
                backend, store=store, rank=rank, world_size=world_size,
                timeout=datetime.timedelta(seconds=PG_TIMEOUT_S),
            )
            # a gloo group is usable on one rank before its peer has connected: a rank whose fn
            # makes no collective would tear the group down under its still-connecting peer
            dist.barrier()
            if init_kwargs is not None:
                bmt_comm.init_distributed(**init_kwargs)
        started = time.monotonic()
        try:
            out = fn(*args)
        except BaseException:
            results.put(("error", rank, traceback.format_exc(), time.monotonic() - started))
            return
        if bmt_creates_group:
            bmt_comm.destroy()  # it owns the default group too
            results.put(("ok", rank, pickle.dumps(out), time.monotonic() - started))
            return
        if init_kwargs is not None and bmt_comm.is_initialized():
            bmt_comm.destroy()
        dist.destroy_process_group()
        # plain pickle copies tensors by value; the queue's own pickler would pass shared-memory
        # handles that die with this process
        results.put(("ok", rank, pickle.dumps(out), time.monotonic() - started))
    except BaseException:  # noqa: BLE001 - report everything, including SystemExit
        results.put(("error", rank, traceback.format_exc(), 0.0))


class DistributedTestError(AssertionError):
    pass


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    init_kwargs: Mapping[str, Any] | None = MappingProxyType({}),
    env: dict[str, str] | None = None,
    timeout: float = RUN_TIMEOUT_S,
) -> list[Any]:
    """Run ``fn(*args)`` on ``world_size`` ranks and return each rank's result, by rank.

    ``fn`` must be importable (a module-level function). Before it runs, each rank has a gloo
    default group and, unless ``init_kwargs`` is None, ``bmt_comm.init_distributed(**init_kwargs)``.
    """
    if init_kwargs is not None:
        init_kwargs = dict(init_kwargs)
    ctx = _context()
    results = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="bmt-dist-") as tmp:
        store_path = os.path.join(tmp, "store")
        procs = [
            ctx.Process(
                target=_worker,
                args=(r, world_size, store_path, fn, args, init_kwargs, env or {}, results),
                daemon=True,
            )
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        outputs: dict[int, Any] = {}
        deadline = time.monotonic() + timeout
        try:
            while len(outputs) < world_size:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    missing = sorted(set(range(world_size)) - set(outputs))
                    raise DistributedTestError(
                        f"distributed run of {fn.__name__} timed out after {timeout:.0f}s; "
                        f"ranks {missing} never finished (a hung collective?)"
                    )
                try:
                    status, rank, payload, _ = results.get(timeout=min(remaining, 1.0))
                except queue.Empty:
                    dead = [r for r, p in enumerate(procs) if r not in outputs and p.exitcode not in (None, 0)]
                    if dead:
                        time.sleep(0.5)  # let a just-written traceback arrive
                        if results.empty():
                            raise DistributedTestError(
                                f"rank {dead[0]} of {fn.__name__} died with exit code "
                                f"{procs[dead[0]].exitcode} and no traceback"
                            ) from None
                    continue
                if status == "error":
                    raise DistributedTestError(f"rank {rank} of {world_size} failed in {fn.__name__}:\n{payload}")
                outputs[rank] = pickle.loads(payload)
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
            for p in procs:
                p.join(timeout=5)
            results.close()
    return [outputs[r] for r in range(world_size)]


@dataclass(frozen=True)
class Outcome:
    """How one rank ended: ``ok`` (value), ``error`` (traceback), ``exit`` (exit code, no
    report), ``hung`` (still running at the deadline); ``elapsed`` s from ``fn``'s start."""

    status: str
    value: Any = None
    traceback: str = ""
    exitcode: int | None = None
    elapsed: float = 0.0


def run_distributed_outcomes(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    init_kwargs: Mapping[str, Any] | None = MappingProxyType({}),
    env: dict[str, str] | None = None,
    timeout: float = RUN_TIMEOUT_S,
    bmt_creates_group: bool = False,
    watch: Sequence[int] | None = None,
) -> list[Outcome]:
    """Like :func:`run_distributed` but no rank's failure stops the others: every rank's outcome,
    by rank, once each has reported, died, or outlived ``timeout`` (then it is killed). With
    ``watch``, the run ends as soon as those ranks have ended (the others are killed: ``hung``)."""
    init = dict(init_kwargs) if init_kwargs is not None else None
    ctx = _context()
    results = ctx.Queue()
    outcomes: dict[int, Outcome] = {}
    with tempfile.TemporaryDirectory(prefix="bmt-dist-") as tmp:
        store_path = os.path.join(tmp, "store")
        procs = [
            ctx.Process(
                target=_worker,
                args=(r, world_size, store_path, fn, args, init, env or {}, results, bmt_creates_group),
                daemon=True,
            )
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        try:
            needed = set(range(world_size) if watch is None else watch)
            while not needed <= set(outcomes) and time.monotonic() < deadline:
                try:
                    status, rank, payload, elapsed = results.get(timeout=0.5)
                except queue.Empty:
                    for r, p in enumerate(procs):
                        if r not in outcomes and p.exitcode is not None and results.empty():
                            outcomes[r] = Outcome("exit", exitcode=p.exitcode)
                    continue
                if status == "ok":
                    outcomes[rank] = Outcome("ok", value=pickle.loads(payload), elapsed=elapsed)
                else:
                    outcomes[rank] = Outcome("error", traceback=payload, elapsed=elapsed)
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
            for p in procs:
                p.join(timeout=5)
            results.close()
    return [outcomes.get(r, Outcome("hung")) for r in range(world_size)]
