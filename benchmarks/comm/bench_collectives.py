"""All-gather and reduce-scatter bus bandwidth: bmt's NcclCommunicator vs torch.distributed NCCL.

    python benchmarks/comm/bench_collectives.py --out comm.json        # one process per visible GPU
    torchrun --nproc_per_node=2 benchmarks/comm/bench_collectives.py   # or under torchrun

Both transports run in the same processes on the same GPUs, size by size: bmt-comm's
``NcclCommunicator`` (the ctypes binding) and torch's ``all_gather_into_tensor`` /
``reduce_scatter_tensor``. Times come from CUDA events around each call, after warm-up; the
median of the iterations, then the slowest rank's median, is reported. As in nccl-tests, the
size is the gathered (all-gather output / reduce-scatter input) buffer and

    bus bandwidth = (n - 1) / n * size / time.

Latency is the time per call of back-to-back 4 KiB calls (GPU events over a loop) and the host
time to enqueue one call. Results print as markdown tables and, with --out, go to a JSON file.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

try:
    import bmtrain  # noqa: F401  # installed: bmt-comm and bmtrain.benchmark come with it
except ImportError:  # run from a checkout without installing: use the source tree
    for _package in ("bmt-comm", "bmt-zero", "bmt-ckpt", "bmt-optim", "bmtrain"):
        sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "packages" / _package / "src"))
from bmt_comm import ReduceOp
from bmt_comm.nccl import NcclCommunicator, get_library
from bmtrain.benchmark.timing import bandwidth, slowest, time_calls

MiB = 1 << 20
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class BandwidthRow:
    op: str
    impl: str
    bytes: int
    time_us: float
    algbw_gbps: float
    busbw_gbps: float


@dataclass(frozen=True)
class LatencyRow:
    op: str
    impl: str
    bytes: int
    gpu_us: float  # per call, back-to-back on the stream
    host_us: float  # per call, time to enqueue


def _parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def _sizes(lo: int, hi: int, factor: int) -> list[int]:
    out, s = [], lo
    while s <= hi:
        out.append(s)
        s *= factor
    return out


def _check(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    if not torch.equal(got, want):
        raise RuntimeError(f"{name} gave a wrong result: {got[:4].tolist()} != {want[:4].tolist()}")


def _bench_size(
    bmt: NcclCommunicator, size: int, dtype: torch.dtype, warmup: int, iters: int
) -> list[BandwidthRow]:
    rank, n, dev = bmt.rank, bmt.size, bmt.device
    esize = torch.tensor([], dtype=dtype).element_size()
    numel = size // esize // n * n  # the gathered buffer, a multiple of n elements
    shard = numel // n
    big = torch.empty(numel, dtype=dtype, device=dev)
    small = torch.empty(shard, dtype=dtype, device=dev)
    calls: dict[tuple[str, str], Callable[[], object]] = {
        ("all_gather", "bmt"): lambda: bmt.all_gather(small, big),
        ("all_gather", "torch"): lambda: dist.all_gather_into_tensor(big, small),
        ("reduce_scatter", "bmt"): lambda: bmt.reduce_scatter(big, small, ReduceOp.SUM),
        ("reduce_scatter", "torch"): lambda: dist.reduce_scatter_tensor(small, big),
    }
    rows = []
    for (op, impl), fn in calls.items():
        # correctness once per size, so the numbers describe a working call
        (small if op == "all_gather" else big).fill_(rank + 1)
        fn()
        stride = max(shard // 64, 1)
        if op == "all_gather":  # element i came from rank i // shard
            want = (torch.arange(0, numel, stride, device=dev) // shard + 1).to(dtype)
            _check(f"{impl} all_gather {size}", big[::stride], want)
        else:
            _check(f"{impl} reduce_scatter {size}", small[::stride],
                   torch.full_like(small[::stride], n * (n + 1) // 2))
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        seconds = slowest(statistics.median(time_calls(fn, dev, iters, each=True)), bmt)
        nbytes = numel * esize
        algbw, busbw = bandwidth(nbytes, seconds, (n - 1) / n)
        rows.append(BandwidthRow(op, impl, nbytes, seconds * 1e6, algbw, busbw))
    return rows


def _bench_latency(bmt: NcclCommunicator, dtype: torch.dtype, calls_per_loop: int = 200) -> list[LatencyRow]:
    n, dev = bmt.size, bmt.device
    esize = torch.tensor([], dtype=dtype).element_size()
    numel = 4096 // esize // n * n
    big = torch.zeros(numel, dtype=dtype, device=dev)
    small = torch.zeros(numel // n, dtype=dtype, device=dev)
    calls: dict[tuple[str, str], Callable[[], object]] = {
        ("all_gather", "bmt"): lambda: bmt.all_gather(small, big),
        ("all_gather", "torch"): lambda: dist.all_gather_into_tensor(big, small),
        ("reduce_scatter", "bmt"): lambda: bmt.reduce_scatter(big, small, ReduceOp.SUM),
        ("reduce_scatter", "torch"): lambda: dist.reduce_scatter_tensor(small, big),
    }
    rows = []
    for (op, impl), fn in calls.items():
        for _ in range(20):
            fn()
        gpu, host = [], []
        for _ in range(7):
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0 = time.perf_counter()
            start.record()
            for _ in range(calls_per_loop):
                fn()
            end.record()
            host.append((time.perf_counter() - t0) / calls_per_loop * 1e6)
            torch.cuda.synchronize()
            gpu.append(start.elapsed_time(end) * 1000.0 / calls_per_loop)
        rows.append(LatencyRow(op, impl, numel * esize, slowest(statistics.median(gpu), bmt),
                               slowest(statistics.median(host), bmt)))
    return rows


def _torch_nccl_version() -> str:
    v = torch.cuda.nccl.version()
    return ".".join(map(str, v)) if isinstance(v, tuple) else str(v)


def _report(meta: dict[str, Any], bw: list[BandwidthRow], lat: list[LatencyRow]) -> str:
    lines = [
        f"## Collectives: bmt NcclCommunicator vs torch.distributed NCCL ({meta['world_size']} x {meta['gpu']}, "
        f"{meta['dtype']}, NCCL {meta['nccl_version']}, torch {meta['torch']})",
        "",
        "| op | size | bmt busbw GB/s | torch busbw GB/s | bmt / torch | bmt time us | torch time us |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    by_key = {(r.op, r.impl, r.bytes): r for r in bw}
    for op in ("all_gather", "reduce_scatter"):
        for size in sorted({r.bytes for r in bw if r.op == op}):
            b, t = by_key[(op, "bmt", size)], by_key[(op, "torch", size)]
            lines.append(
                f"| {op} | {size / MiB:.0f} MiB | {b.busbw_gbps:.1f} | {t.busbw_gbps:.1f} | "
                f"{b.busbw_gbps / t.busbw_gbps:.2f} | {b.time_us:.1f} | {t.time_us:.1f} |"
            )
    lines += ["", "| op (4 KiB) | bmt us/call (GPU) | torch us/call (GPU) | bmt us to enqueue | torch us to enqueue |",
              "|---|---:|---:|---:|---:|"]
    lat_by = {(r.op, r.impl): r for r in lat}
    for op in ("all_gather", "reduce_scatter"):
        b, t = lat_by[(op, "bmt")], lat_by[(op, "torch")]
        lines.append(f"| {op} | {b.gpu_us:.1f} | {t.gpu_us:.1f} | {b.host_us:.1f} | {t.host_us:.1f} |")
    return "\n".join(lines)


def _worker(rank: int, world: int, store_path: str | None, args: argparse.Namespace) -> None:
    local = int(os.environ.get("LOCAL_RANK", rank))
    dev = torch.device("cuda", local)
    torch.cuda.set_device(dev)
    timeout = datetime.timedelta(seconds=120)
    if store_path is not None:  # launched by this script
        base: dist.Store = dist.FileStore(store_path, world)
        dist.init_process_group("nccl", store=dist.PrefixStore("torch", base), rank=rank, world_size=world,
                                timeout=timeout, device_id=dev)
    else:  # torchrun
        dist.init_process_group("nccl", timeout=timeout, device_id=dev)
        from torch.distributed.distributed_c10d import _get_default_store

        base = _get_default_store()
    bmt = NcclCommunicator.from_store(dist.PrefixStore("bmt", base), "bench", tuple(range(world)), rank, dev)
    dtype = DTYPES[args.dtype]
    try:
        bw: list[BandwidthRow] = []
        for size in _sizes(args.min_size, args.max_size, args.factor):
            bw += _bench_size(bmt, size, dtype, args.warmup, args.iters)
            torch.cuda.empty_cache()  # this size's buffers are gone: free them for the next
        lat = _bench_latency(bmt, dtype)
        if rank == 0:
            nccl = get_library()
            meta = {
                "benchmark": "comm/bench_collectives",
                "world_size": world,
                "gpu": torch.cuda.get_device_name(dev),
                "dtype": args.dtype,
                "nccl_version": ".".join(map(str, nccl.version)),
                "nccl_library": nccl.path,
                "torch": torch.__version__,
                "torch_nccl_version": _torch_nccl_version(),
                "warmup": args.warmup,
                "iters": args.iters,
                "statistic": "median over iterations, max over ranks",
            }
            print(_report(meta, bw, lat), flush=True)
            if args.out:
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                payload = {**meta, "bandwidth": [asdict(r) for r in bw], "latency_4KiB": [asdict(r) for r in lat]}
                Path(args.out).write_text(json.dumps(payload, indent=1))
    finally:
        torch.cuda.synchronize()
        bmt.close()
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--out", default="", help="write the results as JSON here")
    p.add_argument("--nproc", type=int, default=0, help="processes (GPUs); default: every visible GPU")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--min-size", type=_parse_size, default=MiB, help="smallest gathered buffer (e.g. 1M)")
    p.add_argument("--max-size", type=_parse_size, default=1 << 30, help="largest gathered buffer (e.g. 1G)")
    p.add_argument("--factor", type=int, default=4, help="size step (powers of this)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    args = p.parse_args(argv)
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast stays off on shared hosts

    if "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ:  # under torchrun
        _worker(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), None, args)
        return 0
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    nproc = args.nproc or gpus
    if nproc < 2 or gpus < nproc:
        reason = f"needs at least 2 GPUs (asked for {nproc}, {gpus} visible)"
        print(f"bench_collectives skipped: {reason}")
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps({"benchmark": "comm/bench_collectives", "skipped": reason}))
        return 0
    with tempfile.TemporaryDirectory(prefix="bmt-bench-") as tmp:
        mp.spawn(_worker, args=(nproc, os.path.join(tmp, "store"), args), nprocs=nproc, join=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
