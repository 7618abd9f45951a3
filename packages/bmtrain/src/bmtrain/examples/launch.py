"""Start the training run on every local GPU (NCCL), or on 2 CPU processes (gloo).

Under ``torchrun`` (``RANK`` and ``WORLD_SIZE`` set) the run starts in this process. Otherwise
this process starts one worker per rank with ``torch.multiprocessing``, gives each the
environment ``torchrun`` would (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``)
and a rendezvous file in a temporary directory (no ports), and fails with the first failing
worker's traceback. CPU workers are forked, so they start at once with torch already imported;
GPU workers are spawned, as CUDA requires.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import replace
from typing import Any

import torch
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import start_processes

from .loop import RunResult, run
from .options import TrainOptions

__all__ = ["under_launcher", "default_nproc", "launch"]


def under_launcher() -> bool:
    """True when a launcher (torchrun, or ours) already made this process one rank of many."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def default_nproc() -> int:
    """Every visible GPU, else 2 CPU processes."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 2


def _limit_cpu_threads(local_world_size: int) -> None:
    if not torch.cuda.is_available():
        # ranks share the host's cores: one full pool of threads per rank would oversubscribe them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world_size))


def _worker(local_rank: int, nproc: int, opts: TrainOptions, results: Any) -> None:
    os.environ.update(
        RANK=str(local_rank), WORLD_SIZE=str(nproc), LOCAL_RANK=str(local_rank), LOCAL_WORLD_SIZE=str(nproc)
    )
    _limit_cpu_threads(nproc)
    result = run(opts)
    if local_rank == 0:
        results.put(result)


def launch(opts: TrainOptions) -> RunResult:
    """Run ``opts`` on ``opts.nproc`` local processes (in this one when that is 1)."""
    if under_launcher():
        _limit_cpu_threads(int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        return run(opts)
    nproc = opts.nproc or default_nproc()
    if nproc == 1:
        return run(opts)
    method = "spawn" if torch.cuda.is_available() else "fork"  # a forked child cannot use CUDA
    ctx = mp.get_context(method)
    results = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory(prefix="bmtrain-train-") as tmp:
        opts = replace(opts, init_method=f"file://{os.path.join(tmp, 'rendezvous')}")
        start_processes(  # type: ignore[no-untyped-call]
            _worker, args=(nproc, opts, results), nprocs=nproc, join=True, start_method=method
        )
    result: RunResult = results.get()
    return result
