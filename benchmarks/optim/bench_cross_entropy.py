"""Fused cross-entropy (Triton) vs torch on bf16/fp16 logits: time and memory of forward + backward.

Peers in the same run, for each shape:
- ``fused``: ``FusedCrossEntropy`` (per-row stats only, gradient in the logits' dtype);
- ``fused inplace``: the same, gradient written into the logits;
- ``torch fp32``: ``F.cross_entropy(logits.float())`` (what the fused one matches numerically);
- ``torch half``: ``F.cross_entropy(logits)`` directly on the half logits.
The bandwidth bound assumes 3 passes over the logits (forward read, backward read and write),
against the measured device-to-device copy bandwidth. Also times the inf/nan check.

    python benchmarks/optim/bench_cross_entropy.py [--dtype bf16|fp16] [--iters 20]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import torch
import torch.nn.functional as F
from bmt_optim.loss import FusedCrossEntropy
from bmt_optim.nan_check import check_inf_nan_, new_flag

SHAPES = [(256, 128 * 1024), (4096, 32000), (8192, 128256)]
MIB = 1 << 20


RESULTS: list[dict[str, object]] = []

def _time_ms(fn: Callable[[], object], iters: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def copy_bandwidth() -> float:
    """Bytes per second of a large device-to-device copy (read + write)."""
    a = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = _time_ms(lambda: b.copy_(a), 20)
    return 2 * a.numel() / (ms / 1e3)


def _peak_mib(fn: Callable[[], object]) -> float:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / MIB


def bench_shape(n: int, c: int, dtype: torch.dtype, iters: int, bw: float) -> None:
    x = (torch.randn(n, c, device="cuda") * 3).to(dtype)
    t = torch.randint(0, c, (n,), device="cuda")
    logits_mib = x.numel() * x.element_size() / MIB
    fused, fused_ip = FusedCrossEntropy(), FusedCrossEntropy(inplace=True)

    def run_fused() -> None:
        xl = x.detach().requires_grad_()
        torch.autograd.grad(fused(xl, t), xl)

    def run_fused_inplace() -> None:
        xl = x.detach().clone().requires_grad_()  # the clone is timed too: subtract the copy below
        torch.autograd.grad(fused_ip(xl, t), xl)

    def run_torch_fp32() -> None:
        xl = x.detach().requires_grad_()
        torch.autograd.grad(F.cross_entropy(xl.float(), t), xl)

    def run_torch_half() -> None:
        xl = x.detach().requires_grad_()
        torch.autograd.grad(F.cross_entropy(xl, t), xl)

    clone_ms = _time_ms(lambda: x.clone(), iters)
    bound_ms = 3 * x.numel() * x.element_size() / bw * 1e3
    print(f"\n{n} x {c} {dtype}: logits {logits_mib:.0f} MiB, bandwidth bound {bound_ms:.3f} ms")
    print(f"  {'peer':<16}{'ms':>10}{'% of bound':>12}{'peak MiB':>12}")
    for name, fn, extra_ms in [
        ("fused", run_fused, 0.0),
        ("fused inplace", run_fused_inplace, clone_ms),
        ("torch fp32", run_torch_fp32, 0.0),
        ("torch half", run_torch_half, 0.0),
    ]:
        try:
            ms = _time_ms(fn, iters) - extra_ms
            peak = _peak_mib(fn) - (logits_mib if extra_ms else 0.0)
        except torch.OutOfMemoryError:
            print(f"  {name:<16}{'OOM':>10}")
            torch.cuda.empty_cache()
            continue
        print(f"  {name:<16}{ms:>10.3f}{100 * bound_ms / ms:>11.1f}%{peak:>12.1f}")
        RESULTS.append(
            {"bench": "cross_entropy", "shape": [n, c], "dtype": str(dtype), "peer": name, "ms": ms,
             "bound_ms": bound_ms, "peak_mib": peak}
        )


def bench_nan_check(iters: int, bw: float) -> None:
    print("\ninf/nan check (read-only pass)")
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(1 << 28, device="cuda").to(dtype)
        flag = new_flag("cuda")
        ms = _time_ms(lambda x=x, flag=flag: check_inf_nan_(x, flag), iters)
        ms_torch = _time_ms(lambda x=x: torch.isfinite(x).all(), iters)
        bound = x.numel() * x.element_size() / bw * 1e3
        print(f"  {dtype} 2^28: ours {ms:.3f} ms ({100 * bound / ms:.0f}% of bound), torch isfinite().all() {ms_torch:.3f} ms")
        RESULTS.append(
            {"bench": "nan_check", "dtype": str(dtype), "numel": 1 << 28, "ms": ms, "torch_ms": ms_torch, "bound_ms": bound}
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_cross_entropy: no CUDA device, skipped")
        return
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: device copy bandwidth {bw / 1e9:.0f} GB/s")
    for n, c in SHAPES:
        bench_shape(n, c, dtype, args.iters, bw)
    bench_nan_check(args.iters, bw)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "results": RESULTS}, f, indent=1)


if __name__ == "__main__":
    main()
