"""CPU Adam throughput (elements per second): bmt-optim's C++ kernel vs torch, no GPU needed.

Peers in the same run, all with ``--threads`` threads, at each size of ``--numel`` (default: 64K
elements, which stay in cache and show the compute rate, and 16M, which stream from memory and
show the bandwidth rate):
- ``native fp32``: the C++ kernel on fp32 params and grads (the same work as torch's AdamW);
- ``native bf16``: the C++ kernel as the offload optimizer runs it: bf16 grad in, fp32 master
  and moments, bf16 param out (also 28 bytes per element);
- ``torch fallback bf16``: the vectorised torch path used when the C++ kernel is not built;
- ``torch AdamW fused``: ``torch.optim.AdamW(fused=True)`` on fp32 CPU params (the target: 2x);
- ``torch fused offload job``: what the offload step needs done with torch's fused AdamW: the
  bf16 gradient cast into an fp32 ``.grad``, the fused step on the fp32 master, the master cast
  back into a bf16 parameter (the peer of ``native bf16``);
- ``torch AdamW foreach`` and the default single-tensor path, for reference;
- ``memory ceiling``: the C++ module's ``stream_probe``, Adam's loads and stores (28 bytes per
  element) with one add instead of the arithmetic, on the same threads: no Adam can beat it.

Once both stream from memory they move the same 28 bytes per element, so their ratio there
tends to 1 whatever the arithmetic costs.

    python benchmarks/optim/bench_cpu_adam.py [--numel 65536 16777216] [--threads N] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from typing import Any

import torch
from bmt_optim.cpu_adam import CpuAdamBackend, cpu_adam_update, default_num_threads, native_module
from bmt_optim.kernels_adam import AdamScalars

S = AdamScalars.make(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, step=10, scale=1024.0)


def _median_seconds(fn: Callable[[], object], n: int, iters: int, budget_s: float) -> float:
    """Median seconds per call; small calls are timed in batches of ~1e8 elements' worth."""
    fn()  # warm-up: first touch of the pages, thread pool start
    reps = max(1, (1 << 26) // n)
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < iters and (not times or time.perf_counter() < deadline):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        times.append((time.perf_counter() - t0) / reps)
    times.sort()
    return times[len(times) // 2]


def _state(n: int) -> list[torch.Tensor]:
    return [torch.randn(n), torch.randn(n) * 0.1, torch.rand(n) * 0.01]


def _torch_adamw(n: int, **kw: Any) -> Callable[[], object]:
    p = torch.nn.Parameter(torch.randn(n))
    p.grad = torch.randn(n)
    opt = torch.optim.AdamW([p], lr=1e-3, weight_decay=0.01, **kw)
    return opt.step


def _torch_offload_job(n: int) -> Callable[[], object]:
    master = torch.nn.Parameter(torch.randn(n))
    master.grad = torch.empty(n)
    g16, out = torch.randn(n).bfloat16(), torch.empty(n, dtype=torch.bfloat16)
    opt = torch.optim.AdamW([master], lr=1e-3, weight_decay=0.01, fused=True)

    def step() -> None:
        assert master.grad is not None
        master.grad.copy_(g16)
        opt.step()
        out.copy_(master.detach())

    return step


def bench_size(n: int, threads: int, iters: int, budget: float) -> dict[str, float]:
    mod = native_module()
    results: dict[str, float] = {}

    def add(name: str, fn: Callable[[], object]) -> None:
        sec = _median_seconds(fn, n, iters, budget)
        results[name] = n / sec
        print(f"  {name:<24} {sec * 1e3:9.3f} ms   {n / sec / 1e9:7.3f} G elem/s", flush=True)

    print(f"\n{n} elements, {threads} threads")
    if mod is not None:
        st32, g32 = _state(n), torch.randn(n)
        add("native fp32", lambda: cpu_adam_update(*st32, g32, None, S, num_threads=threads))
        del st32, g32
        st, g16, out = _state(n), torch.randn(n).bfloat16(), torch.empty(n, dtype=torch.bfloat16)
        add("native bf16", lambda: cpu_adam_update(*st, g16, out, S, num_threads=threads))
        add("torch fallback bf16", lambda: cpu_adam_update(*st, g16, out, S, backend=CpuAdamBackend.TORCH))
        del st, g16, out
    else:
        print("  (the C++ kernel is not built: only torch peers)")
    if mod is not None:
        a, b, c, g = (torch.zeros(n) for _ in range(4))
        ptrs = [t.data_ptr() for t in (a, b, c, g)]
        add("memory ceiling", lambda: mod.stream_probe(*ptrs, n, threads))
        del a, b, c, g
    add("torch AdamW fused", _torch_adamw(n, fused=True))
    add("torch fused offload job", _torch_offload_job(n))
    add("torch AdamW foreach", _torch_adamw(n, foreach=True))
    add("torch AdamW single", _torch_adamw(n, foreach=False))
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--numel", type=int, nargs="+", default=[1 << 16, 1 << 24])
    ap.add_argument("--threads", type=int, default=default_num_threads())
    ap.add_argument("--iters", type=int, default=9)
    ap.add_argument("--budget", type=float, default=8.0, help="seconds per peer and size at most")
    ap.add_argument("--out", type=str, default=None, help="write the results as JSON here")
    args = ap.parse_args()
    threads = args.threads
    torch.set_num_threads(threads)  # torch's peers get the same threads as ours
    mod = native_module()
    cpu = platform.processor() or platform.machine()
    print(f"CPU Adam, {threads} threads, {os.cpu_count()} CPUs ({cpu}), SIMD {mod.simd() if mod else None}")
    by_size = {n: bench_size(n, threads, args.iters, args.budget) for n in args.numel}
    print(f"\n| elements | peer | G elem/s | vs torch AdamW fused |  ({threads} threads)")
    print("|---:|---|---:|---:|")
    for n, results in by_size.items():
        base = results["torch AdamW fused"]
        for name, eps in results.items():
            print(f"| {n} | {name} | {eps / 1e9:.3f} | {eps / base:.2f}x |")
    for n, results in by_size.items():
        ratio = results.get("native fp32", 0.0) / results["torch AdamW fused"]
        job = results.get("native bf16", 0.0) / results["torch fused offload job"]
        ceiling = results.get("memory ceiling", 0.0)
        roof = (
            f"; of the memory ceiling: native fp32 {results['native fp32'] / ceiling:.0%}, "
            f"torch fused {results['torch AdamW fused'] / ceiling:.0%}"
            if ceiling
            else ""
        )
        print(f"native fp32 / torch AdamW fused at {n} elements: {ratio:.2f}x (target >= 2x); "
              f"native bf16 / torch fused offload job: {job:.2f}x{roof}")
    if args.out:
        info = {
            "threads": threads,
            "cpus": os.cpu_count(),
            "simd": mod.simd() if mod is not None else None,
            "torch": torch.__version__,
            "elements_per_s": {str(n): r for n, r in by_size.items()},
        }
        with open(args.out, "w") as f:
            json.dump(info, f, indent=2)


if __name__ == "__main__":
    main()
