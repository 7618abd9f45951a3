"""Cost of OptimManager's non-finite guard: ``step()`` with it vs ``skip_nonfinite=False``.

Peers in the same run, on the same model: the parameters of a LLaMA-style model (default the
6.74B LLaMA-7B layout: 32 layers of 4096/11008, vocabulary 32000; 291 bf16 tensors, one per
weight, as a Block's parameters reach the optimizer), AdamOptimizer, no loss scale:
- ``guard``: ``OptimManager()`` (one fused inf/nan pass per dtype, one flag read);
- ``no guard``: ``OptimManager(skip_nonfinite=False)`` (1.0.1's unscaled step);
- the check alone (``_found_overflow``). Target: guard - no guard <= 1% of a 6.74B GPU step;
  the ratio to the optimizer step alone (a much smaller denominator) is reported too.

    python benchmarks/optim/bench_nonfinite_guard.py [--layers 32] [--dim 4096] [--ffn 11008]
        [--vocab 32000] [--iters 10] [--out FILE]
Without CUDA it runs a tiny model on CPU (a smoke check; the numbers mean nothing).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch
from bmt_optim import AdamOptimizer, OptimManager


def time_ms(fn: Callable[[], object], iters: int, cuda: bool, warmup: int = 2) -> float:
    """Median milliseconds per call (host clock around a synchronised call)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def shapes(layers: int, dim: int, ffn: int, vocab: int) -> list[tuple[int, ...]]:
    per_layer = [(dim, dim)] * 4 + [(ffn, dim), (ffn, dim), (dim, ffn), (dim,), (dim,)]
    return [(vocab, dim)] + per_layer * layers + [(dim,), (vocab, dim)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    ap.add_argument("--layers", type=int, default=32 if cuda else 2)
    ap.add_argument("--dim", type=int, default=4096 if cuda else 64)
    ap.add_argument("--ffn", type=int, default=11008 if cuda else 172)
    ap.add_argument("--vocab", type=int, default=32000 if cuda else 500)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--out", type=str, default=None, help="write the results as JSON here")
    args = ap.parse_args()
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16
    params = [torch.nn.Parameter(torch.randn(s, device=dev).mul_(0.02).to(dtype))
              for s in shapes(args.layers, args.dim, args.ffn, args.vocab)]
    for p in params:
        p.grad = torch.randn(p.shape, device=dev).mul_(1e-3).to(dtype)
    numel = sum(p.numel() for p in params)
    opt = AdamOptimizer(params, lr=1e-6, weight_decay=0.01)
    guarded, unguarded = OptimManager(), OptimManager(skip_nonfinite=False)
    guarded.add_optimizer(opt)
    unguarded.add_optimizer(opt)  # the same optimizer and state: only the check differs

    def step(m: OptimManager) -> None:
        assert m.step()

    no_guard_ms = time_ms(lambda: step(unguarded), args.iters, cuda)
    guard_ms = time_ms(lambda: step(guarded), args.iters, cuda)
    check_ms = time_ms(guarded._found_overflow, args.iters, cuda)
    grad_bytes = numel * torch.empty((), dtype=dtype).element_size()
    res = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "numel": numel,
        "tensors": len(params),
        "dtype": str(dtype),
        "step_no_guard_ms": no_guard_ms,
        "step_guard_ms": guard_ms,
        "guard_cost_ms": guard_ms - no_guard_ms,
        "guard_over_no_guard": guard_ms / no_guard_ms,
        "check_alone_ms": check_ms,
        "check_GBps": grad_bytes / (check_ms / 1e3) / 1e9,
    }
    print(f"\nOptimManager.step(), AdamOptimizer, {numel / 1e9:.2f}B {dtype} params in {len(params)} tensors, "
          f"{res['device']}, no loss scale\n")
    print("| peer | ms / step |\n|---|---:|")
    print(f"| no guard (skip_nonfinite=False) | {no_guard_ms:.2f} |")
    print(f"| guard (default) | {guard_ms:.2f} |")
    print(f"| the check alone (fused pass + all-reduce + flag read) | {check_ms:.2f} |")
    print(f"\nguard / no guard: {res['guard_over_no_guard']:.3f}; the check reads the gradients at "
          f"{res['check_GBps']:.0f} GB/s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
