"""Offload Adam step on one flat bf16 shard: the overlapped pipeline vs its three stages alone.

Peers in the same run, on ``--numel`` elements (default 1e9) in chunks of ``--chunk`` elements:
- ``D2H``: every gradient chunk copied into pinned host buffers (a side stream, as the step does);
- ``CPU Adam``: the C++ kernel over every chunk (bf16 grad in, fp32 state, bf16 param out);
- ``H2D``: every new parameter chunk copied back to the device;
- ``sequential``: the three one after the other (their sum);
- ``overlapped``: ``AdamOffloadOptimizer.step``. Target: within 1.2x of the slowest stage.

    python benchmarks/optim/bench_offload.py [--numel 1000000000] [--iters 3] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch
from bmt_optim import AdamOffloadOptimizer
from bmt_optim.adam_offload import DEFAULT_CHUNK_NUMEL, default_offload_threads
from bmt_optim.cpu_adam import cpu_adam_update, native_available
from bmt_optim.kernels_adam import AdamScalars


def seconds(fn: Callable[[], object], iters: int) -> float:
    """Median wall seconds per call, the device synchronised around each."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--numel", type=int, default=1_000_000_000)
    ap.add_argument("--chunk", type=int, default=DEFAULT_CHUNK_NUMEL)
    ap.add_argument("--threads", type=int, default=default_offload_threads())
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--out", type=str, default=None, help="write the results as JSON here")
    args = ap.parse_args()
    n, chunk, threads = args.numel, args.chunk, args.threads
    if not native_available():
        print("warning: the C++ CPU Adam is not built; the torch fallback does the CPU stage")

    p = torch.nn.Parameter(torch.randn(n, device="cuda", dtype=torch.bfloat16))
    p.grad = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    opt = AdamOffloadOptimizer([p], lr=1e-4, weight_decay=0.01, chunk_numel=chunk, num_threads=threads)
    overlapped = seconds(lambda: opt.step(scale=1.0), args.iters)  # the first call allocates the host state
    st = opt.state[p]

    # the stages alone, with the step's own chunking and a 3-slot pinned ring
    slots = [torch.empty(chunk, dtype=torch.bfloat16, pin_memory=True) for _ in range(3)]
    outs = [torch.empty(chunk, dtype=torch.bfloat16, pin_memory=True) for _ in range(3)]
    side = torch.cuda.Stream()
    bounds = [(a, min(n, a + chunk)) for a in range(0, n, chunk)]
    flat_g, flat_p = p.grad.view(-1), p.data.view(-1)

    def d2h() -> None:
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for k, (a, b) in enumerate(bounds):
                slots[k % 3][: b - a].copy_(flat_g[a:b], non_blocking=True)
        side.synchronize()

    s = AdamScalars.make(lr=1e-4, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, step=2)

    def cpu() -> None:
        for k, (a, b) in enumerate(bounds):
            m = st["_param_fp32"][a:b]
            cpu_adam_update(m, st["exp_avg"][a:b], st["exp_avg_sq"][a:b], slots[k % 3][: b - a],
                            outs[k % 3][: b - a], s, num_threads=threads)

    def h2d() -> None:
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for k, (a, b) in enumerate(bounds):
                flat_p[a:b].copy_(outs[k % 3][: b - a], non_blocking=True)
        side.synchronize()

    t_d2h, t_cpu, t_h2d = seconds(d2h, args.iters), seconds(cpu, args.iters), seconds(h2d, args.iters)
    slowest = max(t_d2h, t_cpu, t_h2d)
    sequential = t_d2h + t_cpu + t_h2d
    res = {
        "device": torch.cuda.get_device_name(),
        "numel": n,
        "chunk_numel": chunk,
        "threads": threads,
        "d2h_s": t_d2h,
        "cpu_adam_s": t_cpu,
        "h2d_s": t_h2d,
        "sequential_s": sequential,
        "overlapped_s": overlapped,
        "overlapped_over_slowest": overlapped / slowest,
        "d2h_GBps": 2 * n / t_d2h / 1e9,
        "h2d_GBps": 2 * n / t_h2d / 1e9,
        "cpu_G_elem_per_s": n / t_cpu / 1e9,
    }
    print(f"\nOffload Adam step, {n} bf16 elements, chunks of {chunk}, {threads} CPU threads, {res['device']}\n")
    print("| stage | s | note |")
    print("|---|---:|---|")
    print(f"| D2H grads | {t_d2h:.3f} | {res['d2h_GBps']:.1f} GB/s |")
    print(f"| CPU Adam | {t_cpu:.3f} | {res['cpu_G_elem_per_s']:.2f} G elem/s |")
    print(f"| H2D params | {t_h2d:.3f} | {res['h2d_GBps']:.1f} GB/s |")
    print(f"| sequential (sum) | {sequential:.3f} | |")
    print(f"| overlapped step | {overlapped:.3f} | {overlapped / slowest:.2f}x the slowest stage |")
    verdict = "meets" if overlapped <= 1.2 * slowest else "MISSES"
    print(f"\noverlapped / slowest stage = {overlapped / slowest:.2f} ({verdict} the 1.2x target); "
          f"sequential / overlapped = {sequential / overlapped:.2f}x")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
