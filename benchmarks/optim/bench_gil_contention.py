"""Background CPU Adam beside a busy main thread: a Python worker calling the kernel per chunk vs
``CpuAdamQueue`` (the C++ driver thread that never holds the GIL). No GPU needed.

The offload optimizer's background updates (``overlap`` + ``update_during_backward``,
``delay_update``) run while the main thread dispatches a forward or backward: Python that holds
the GIL almost all the time. A worker thread that calls the kernel chunk by chunk must take the
GIL back after each chunk, and waits up to the interpreter's switch interval (5 ms) each time.
Peers in one run, each updating ``--chunks`` chunks of ``--numel`` bf16 elements:

- ``worker, main idle``: a Python worker thread calls the kernel per chunk; the main thread sleeps;
- ``worker, main busy``: the same while the main thread runs small torch ops in a loop;
- ``queue, main busy``: every chunk submitted to a ``CpuAdamQueue``, the main thread as busy.

    python benchmarks/optim/bench_gil_contention.py [--numel 4194304] [--chunks 32] [--threads N]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import time
from collections.abc import Callable

import torch
from bmt_optim.cpu_adam import CpuAdamQueue, cpu_adam_update, default_num_threads, native_module
from bmt_optim.kernels_adam import AdamScalars

S = AdamScalars.make(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, step=10)


def _busy_until(done: Callable[[], bool]) -> int:
    """What a forward's dispatch looks like to the GIL: small torch ops back to back."""
    a, b = torch.ones(8), torch.ones(8)
    ops = 0
    while not done():
        for _ in range(50):
            a = torch.add(a, b).mul_(0.5)
        ops += 50
    return ops


def run(numel: int, chunks: int, threads: int, mode: str) -> dict[str, float]:
    master, m, v = torch.randn(numel * chunks), torch.zeros(numel * chunks), torch.zeros(numel * chunks)
    grad, out = torch.randn(numel * chunks).bfloat16(), torch.empty(numel * chunks, dtype=torch.bfloat16)
    parts = [slice(k * numel, (k + 1) * numel) for k in range(chunks)]
    t0 = time.perf_counter()
    if mode == "queue":
        q = CpuAdamQueue(threads)
        tickets = [q.submit(master[s], m[s], v[s], grad[s], out[s], S) for s in parts]
        ops = _busy_until(lambda: q.done(tickets[-1]))
        cpu = sum(q.wait(t) for t in tickets)
        q.close()
    else:
        pool = concurrent.futures.ThreadPoolExecutor(1)

        def work() -> float:
            total = 0.0
            for s in parts:
                t = time.perf_counter()
                cpu_adam_update(master[s], m[s], v[s], grad[s], out[s], S, num_threads=threads)
                total += time.perf_counter() - t
            return total

        fut = pool.submit(work)
        if mode == "worker-busy":
            ops = _busy_until(fut.done)
        else:
            ops = 0
            while not fut.done():
                time.sleep(0.0005)
        cpu = fut.result()
        pool.shutdown()
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "kernel_s": cpu, "main_ops": float(ops)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--numel", type=int, default=1 << 22)
    ap.add_argument("--chunks", type=int, default=32)
    ap.add_argument("--threads", type=int, default=max(1, default_num_threads() - 1))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=str, default=None)
    args = ap.parse_args()
    if native_module() is None:
        raise SystemExit("the C++ CPU Adam is not built: nothing to compare")
    print(f"{args.chunks} chunks x {args.numel} bf16 elements, {args.threads} kernel threads, {os.cpu_count()} CPUs")
    results: dict[str, dict[str, float]] = {}
    for mode in ("worker-idle", "worker-busy", "queue"):
        runs = sorted((run(args.numel, args.chunks, args.threads, mode) for _ in range(args.repeats)),
                      key=lambda r: r["wall_s"])
        results[mode] = best = runs[len(runs) // 2]
        print(f"  {mode:<12} background done in {best['wall_s'] * 1e3:8.1f} ms "
              f"(kernel {best['kernel_s'] * 1e3:8.1f} ms), main thread ran {best['main_ops']:.0f} ops", flush=True)
    idle = results["worker-idle"]["wall_s"]
    for mode in ("worker-busy", "queue"):
        print(f"{mode} / worker-idle: {results[mode]['wall_s'] / idle:.2f}x")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "results": results, "torch": torch.__version__}, f, indent=2)


if __name__ == "__main__":
    main()
