"""GPU Adam step on one flat bf16 shard: bmt-optim's fused Triton kernel vs torch, vs bandwidth.

Peers in the same run, on ``--numel`` elements (default 1e9, as ZeRO hands the optimizer a few
big flat shards):
- ``bmt AdamOptimizer``: one fused kernel: bf16 grad, fp32 master and moments, bf16 param
  (28 bytes moved per element);
- ``torch AdamW fused + copies``: ``torch.optim.AdamW(fused=True)`` on the fp32 master, after
  casting the bf16 grad into an fp32 grad and before copying the master into the bf16 param;
- the bandwidth limit: 28 bytes per element over the device-to-device copy bandwidth measured
  in this run. Target: the fused step at >= 85% of that limit.

    python benchmarks/optim/bench_adam.py [--numel 1000000000] [--iters 20] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import torch
from bmt_optim import AdamOptimizer
from bmt_optim._adam_triton import adam_update_triton
from bmt_optim.kernels_adam import AdamScalars, Backend, backend_for

BYTES_PER_ELEMENT = 28  # grad 2 + master 4+4 + exp_avg 4+4 + exp_avg_sq 4+4 + param 2


def time_ms(fn: Callable[[], object], iters: int, warmup: int = 3) -> float:
    """Median milliseconds per call (CUDA events around each call)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def copy_bandwidth(nbytes: int, iters: int) -> float:
    """Bytes per second moved (read + write) by a large device-to-device copy."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), iters)
    return 2 * nbytes / (ms / 1e3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--numel", type=int, default=1_000_000_000)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", type=str, default=None, help="write the results as JSON here")
    args = ap.parse_args()
    n = args.numel
    name = torch.cuda.get_device_name()
    bw = copy_bandwidth(min(4 * n, 4 << 30), args.iters)  # as large as one fp32 state tensor (<= 4 GiB)

    # ours: params, grads and state of one flat bf16 shard
    p = torch.nn.Parameter(torch.randn(n, device="cuda", dtype=torch.bfloat16))
    p.grad = (torch.randn(n, device="cuda") * 1024).to(torch.bfloat16)
    assert backend_for(p) is Backend.TRITON, "Triton is needed for the fused GPU kernel"
    opt = AdamOptimizer([p], lr=1e-4, weight_decay=0.01)
    ours_ms = time_ms(lambda: opt.step(scale=1024.0), args.iters)
    st = opt.state[p]
    master = st["_param_fp32"]
    torch.testing.assert_close(p.detach(), master.to(torch.bfloat16), rtol=0, atol=0)
    grad_bf16 = p.grad

    # the kernel alone at other launch shapes (the optimizer uses the first)
    s = AdamScalars.make(lr=1e-4, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, step=2, scale=1024.0)
    sweep = {}
    for block, warps in ((1024, 4), (2048, 4), (2048, 8), (4096, 8), (8192, 16)):
        sweep[f"{block}/{warps}"] = time_ms(
            lambda b=block, w=warps: adam_update_triton(
                p.data, grad_bf16, master, st["exp_avg"], st["exp_avg_sq"], s, block=b, num_warps=w
            ),
            args.iters,
        )
    st.clear()  # frees our moments before torch's are allocated
    opt.state.clear()

    # torch: AdamW(fused) on an fp32 master, fed an fp32 copy of the gradient, then cast back
    ref = torch.nn.Parameter(master)  # the same storage: values do not matter for timing
    ref.grad = torch.empty(n, device="cuda", dtype=torch.float32)
    ref_opt = torch.optim.AdamW([ref], lr=1e-4, weight_decay=0.01, fused=True)

    def torch_step() -> None:
        ref.grad.copy_(grad_bf16)  # type: ignore[union-attr]
        ref.grad.mul_(1 / 1024.0)  # type: ignore[union-attr]  # unscale, as our kernel does in-pass
        ref_opt.step()
        p.data.copy_(ref.data)

    torch_ms = time_ms(torch_step, args.iters)
    limit_ms = BYTES_PER_ELEMENT * n / bw * 1e3
    res = {
        "device": name,
        "numel": n,
        "copy_bandwidth_GBps": bw / 1e9,
        "bandwidth_limit_ms": limit_ms,
        "bmt_adam_ms": ours_ms,
        "torch_adamw_fused_plus_copies_ms": torch_ms,
        "bmt_fraction_of_limit": limit_ms / ours_ms,
        "speedup_vs_torch": torch_ms / ours_ms,
        "kernel_ms_by_block_and_warps": sweep,
    }
    print(f"\nAdam step, {n} bf16 elements, {name}; copy bandwidth {bw / 1e9:.0f} GB/s\n")
    print("| peer | ms / step | GB/s (28 B/elem) | vs limit |")
    print("|---|---:|---:|---:|")
    for label, ms in (("bandwidth limit", limit_ms), ("bmt AdamOptimizer (Triton)", ours_ms),
                      ("torch AdamW fused + copies", torch_ms)):
        print(f"| {label} | {ms:.2f} | {BYTES_PER_ELEMENT * n / ms / 1e6:.0f} | {limit_ms / ms:.0%} |")
    print("\n| kernel BLOCK/num_warps | ms | vs limit |\n|---|---:|---:|")
    for cfg, ms in sweep.items():
        print(f"| {cfg} | {ms:.2f} | {limit_ms / ms:.0%} |")
    verdict = "meets" if res["bmt_fraction_of_limit"] >= 0.85 else "MISSES"
    print(f"\nbmt at {res['bmt_fraction_of_limit']:.0%} of the bandwidth limit ({verdict} the 85% target); "
          f"{res['speedup_vs_torch']:.2f}x torch")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
