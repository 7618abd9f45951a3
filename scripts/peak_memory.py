"""What is alive on the GPU at the peak of one training step, by the code that allocated it.

Records the CUDA caching allocator's history for one step (after warm-up), replays it to the
moment the most memory was allocated, and prints the blocks alive then, grouped by the innermost
frame of bmt code (else of the benchmark, else torch) that allocated them. Run on a GPU host:

    torchrun --nproc_per_node 2 scripts/peak_memory.py [--peer bmt|fsdp2] [--layers 16 ...]
        (benchmarks/ckpt/bench_transformer.py's model)
    torchrun --nproc_per_node 1 scripts/peak_memory.py --train 1b [--peer plain|fsdp2|bmt]
        [--mb 4 --ckpt full ...] (benchmarks/train's yardstick, with bench_train.py's options)
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
from typing import Any

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks", "ckpt"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks", "train"))
import bench_transformer as bt  # noqa: E402


def _where(frames: list[dict[str, Any]]) -> str:
    for marks in (("bmt_", "bmtrain"), ("bench_transformer", "runners", "yardstick"), ("torch/",)):
        for f in frames:
            if any(m in f["filename"] for m in marks):
                return f"{os.path.basename(f['filename'])}:{f['line']} {f['name']}"
    return "?"


def _grouped(live: dict[int, dict[str, Any]], top: int) -> list[str]:
    groups: collections.Counter[str] = collections.Counter()
    counts: collections.Counter[str] = collections.Counter()
    for e in live.values():
        key = _where(e.get("frames", []))
        groups[key] += e["size"]
        counts[key] += 1
    return [f"  {size / 2**20:9.1f} MiB in {counts[key]:4d} blocks  {key}" for key, size in groups.most_common(top)]


def peak_report(trace: list[dict[str, Any]], top: int, step_starts: int = 0) -> list[str]:
    """Replay ``trace``: what was alive when the step began (event ``step_starts``) and at the
    step's peak."""
    live: dict[int, dict[str, Any]] = {}
    cur = best = 0
    at_start: dict[int, dict[str, Any]] = {}
    at_best: dict[int, dict[str, Any]] = {}
    start_bytes = 0
    for i, e in enumerate(trace):
        if i == step_starts:
            at_start, start_bytes, best = dict(live), cur, 0
        if e["action"] == "alloc":
            live[e["addr"]] = e
            cur += e["size"]
            if i >= step_starts and cur > best:
                best, at_best = cur, dict(live)
        elif e["action"] == "free_requested" and e["addr"] in live:
            cur -= live.pop(e["addr"])["size"]
    lines = [f"alive when the step begins: {start_bytes / 2**20:.0f} MiB", *_grouped(at_start, top)]
    lines += [f"alive at the step's peak: {best / 2**20:.0f} MiB", *_grouped(at_best, top)]
    return lines


def record() -> None:
    torch.cuda.memory._record_memory_history(max_entries=4_000_000, stacks="python")


def traced_step(step: Any, warmup: int, top: int, label: str, device: torch.device, rank: int) -> None:
    """Warm up, then trace one ``step()`` and print what was alive at its start and its peak (the
    history is recorded from ``record()`` on, called before the model is built)."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    starts = len(torch.cuda.memory._snapshot()["device_traces"][device.index])
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    trace = snap["device_traces"][device.index]
    if rank == 0:
        print(f"[{label}] before the step: {base / 2**20:.0f} MiB allocated; "
              f"peak {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
        print("\n".join(peak_report(trace, top, starts)), flush=True)


def train_main(argv: list[str]) -> None:
    """``--train CONFIG --peer plain|fsdp2|bmt`` plus bench_train.py's options (--mb, --ckpt, ...)."""
    import bench_train
    from runners import RUNNERS
    from yardstick import CONFIGS

    ap = argparse.ArgumentParser()
    ap.add_argument("--train", choices=sorted(CONFIGS), required=True)
    ap.add_argument("--peer", choices=sorted(RUNNERS), default="bmt")
    ap.add_argument("--top", type=int, default=25)
    known, rest = ap.parse_known_args(argv)
    args = bench_train._options(["--config", known.train, *rest])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local)
    record()
    step = RUNNERS[known.peer](CONFIGS[known.train], args)
    rank = int(os.environ.get("RANK", "0"))
    traced_step(step, args.warmup, known.top, f"{known.peer} {known.train} mb {args.mb} ckpt {args.ckpt}",
                torch.device("cuda", local), rank)


def main() -> None:
    if "--train" in sys.argv:
        train_main(sys.argv[1:])
        return
    import bmt_comm

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peer", choices=["bmt", "fsdp2"], default="bmt")
    bt.add_model_args(ap)
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    s = bt.Setup(dim=args.dim, heads=args.heads, layers=args.layers, seq=args.seq, batch=args.batch, steps=1, warmup=2)
    bmt_comm.init_distributed()
    ctx = bmt_comm.get_context()
    torch.manual_seed(1 + ctx.rank)
    x = torch.randn(s.batch, s.seq, s.dim, device=ctx.device, dtype=torch.bfloat16)

    # the benchmark's own _time, recording one step after its warm-up
    real_time = bt._time

    def traced(step: Any, setup: bt.Setup) -> tuple[float, float]:
        traced_step(step, setup.warmup, args.top, args.peer, ctx.device, ctx.rank)
        return 0.0, 0.0

    record()
    bt._time = traced
    try:
        (bt.bench_bmt if args.peer == "bmt" else bt.bench_fsdp2)(s, x)
    finally:
        bt._time = real_time
    bmt_comm.destroy()


if __name__ == "__main__":
    main()
