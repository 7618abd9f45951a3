"""The training benchmark of record: the yardstick trained with bmt, PyTorch FSDP2 and plain torch.

    python3 benchmarks/train/bench_train.py --config 1b --mb 4 [--ckpt full|recompute_all|selective|none] [--compile]
        [--accum N] [--clip MAX_NORM] [--offload [step|overlap|eager|lazy|delayed]] [--no-guard]
        [--impls plain,fsdp2,bmt] [--nproc N] [--out results.jsonl]

One job, the runners one after the other, each in fresh processes launched with torchrun on every
visible GPU (plain torch on one GPU only: it is the reference a sharding library is measured by):

- plain: bf16 parameters on one GPU, ``torch.optim.AdamW(fused=True)``, no wrapper;
- fsdp2: ``fully_shard`` per layer and at the root, fp32 sharded parameters,
  ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``, ``AdamW(fused=True)``;
- bmt: one ``bmt.Block`` per layer in a ``bmt.TransformerBlockList``, bf16 parameters,
  ``bmt.optim.AdamOptimizer`` (fp32 master weights; ``AdamOffloadOptimizer`` with ``--offload``)
  under ``bmt.optim.OptimManager(loss_scale=None)``, gradients dropped after each step
  (``zero_grad(set_to_none=True)``, as the peers do; 1.0.1 zeroes them in place).

All use the same activation checkpointing (``--ckpt``: every layer, selectively with the same
policy, or none; the peers' torch checkpoint always stops recomputing early, bmt's default full
checkpointing recomputes the whole layer as 1.0.1 does and ``recompute_all`` stops early too), the same compilation (``--compile``: every layer) and random tokens.
Printed and appended as JSON lines to ``--out``: median step time after warm-up, tokens/s per GPU,
MFU against 989 TFLOP/s (H100/H200 dense bf16) and against the bf16 matmul rate measured in the
same job, peak allocated memory, and each runner's ratio to plain and to FSDP2.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PEAK_TFLOPS = 989.0  # H100/H200 SXM dense bf16
IMPLS = ("plain", "fsdp2", "bmt")


def _options(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", choices=("1b", "7b", "tiny"), default="1b")
    p.add_argument("--mb", type=int, default=None, help="micro-batch per GPU (default: 4 for 1b, 2 for 7b)")
    p.add_argument("--accum", type=int, default=1, help="micro-batches accumulated per optimizer step")
    p.add_argument("--ckpt", choices=("full", "recompute_all", "selective", "none"), default="full",
                   help="activation checkpointing of every layer (selective: keep matmul and attention outputs; "
                        "recompute_all: full, bmt through checkpoint_policy='recompute_all', the peers as for full)")
    p.add_argument("--compile", action="store_true", help="torch.compile every layer (bmt: Block(compile=True))")
    p.add_argument("--offload", nargs="?", const="step", default=None, choices=("step", "overlap", "eager", "lazy", "delayed"),
                   help="bmt only: AdamOffloadOptimizer (CPU Adam); step: everything in step() (1.0.1), overlap: "
                        "gradients copied to the host during backward (overlap=True), eager: overlap plus the CPU Adam "
                        "started during the last backward (OptimManager.update_during_backward(); with the guard or --clip, each "
                        "Block's gradients are checked as they arrive and every update starts at step()), "
                        "lazy: eager plus overlap_forward=True (each Block's new values land at its first read in the "
                        "next forward), "
                        "delayed: the one-step-delayed update (delay_update=True, changes numerics)")
    p.add_argument("--offload-fraction", type=float, default=1.0,
                   help="with --offload: AdamOffloadOptimizer(offload_fraction=...), the share of elements updated on the CPU")
    p.add_argument("--speculate", type=float, default=0.0, metavar="F",
                   help="with --offload lazy: AdamOffloadOptimizer(speculative_fraction=F), the share of elements whose "
                        "update may start during a guarded backward (backed up, undone if the step is skipped)")
    p.add_argument("--no-guard", action="store_true", help="bmt only: OptimManager(skip_nonfinite=False)")
    p.add_argument("--clip", type=float, default=None, metavar="MAX_NORM",
                   help="clip the gradients' global 2-norm before each step (plain, fsdp2: torch.nn.utils.clip_grad_norm_; "
                        "bmt: OptimManager.clip_grad_norm)")
    p.add_argument("--impls", default=",".join(IMPLS), help="comma-separated runners, in order")
    p.add_argument("--nproc", type=int, default=None, help="GPUs for fsdp2 and bmt (default: every visible GPU)")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", default=None, help="append one JSON line per runner to this file")
    p.add_argument("--timeout", type=float, default=900, help="seconds per runner before it is killed")
    p.add_argument("--worker", choices=IMPLS + ("matmul",), default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.mb = args.mb or (2 if args.config == "7b" else 4)
    for name in ("mb", "accum", "steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    bad = [i for i in args.impls.split(",") if i not in IMPLS]
    if bad:
        p.error(f"--impls takes {', '.join(IMPLS)}; got {', '.join(bad)}")
    if args.offload and args.impls != "bmt":
        p.error("--offload runs the bmt runner only: pass --impls bmt")
    if args.speculate and args.offload != "lazy":
        p.error(f"--speculate needs --offload lazy (got --offload {args.offload})")
    if args.clip is not None and not args.clip > 0:
        p.error(f"--clip must be > 0, got {args.clip}")
    return args


# --- the parent: one runner after the other ---------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _launch(args: argparse.Namespace, worker: str, nproc: int, argv: list[str]) -> dict[str, Any] | None:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [
            sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            f"--master_port={_free_port()}", str(Path(__file__).resolve()),
            *argv, "--worker", worker, "--result", str(result),
        ]
        started = time.monotonic()
        try:
            rc = subprocess.run(cmd, timeout=args.timeout, check=False).returncode
        except subprocess.TimeoutExpired:
            print(f"[bench_train] {worker}: killed after {args.timeout:.0f} s", flush=True)
            return None
        if rc != 0 or not result.exists():
            print(f"[bench_train] {worker}: exit {rc} after {time.monotonic() - started:.0f} s, no result", flush=True)
            return None
        loaded: dict[str, Any] = json.loads(result.read_text())
        return loaded


def _parent(args: argparse.Namespace, argv: list[str]) -> int:
    import torch

    gpus = torch.cuda.device_count()
    if gpus == 0:
        print("bench_train needs a CUDA GPU", file=sys.stderr)
        return 2
    nproc = args.nproc or gpus
    matmul = _launch(args, "matmul", 1, argv)
    rows: list[dict[str, Any]] = []
    for impl in args.impls.split(","):
        row = _launch(args, impl, 1 if impl == "plain" else nproc, argv)
        if row is None:
            rows.append({"impl": impl, "failed": True})
            continue
        if matmul is not None:
            row["matmul_tflops"] = matmul["tflops"]
            row["mfu_vs_matmul"] = row["tflops_per_gpu"] / matmul["tflops"]
        rows.append(row)
    ok = {r["impl"]: r for r in rows if not r.get("failed")}
    for r in rows:
        for peer in ("plain", "fsdp2"):
            if peer in ok and not r.get("failed") and r["impl"] != peer:
                r[f"vs_{peer}"] = r["tokens_per_s_per_gpu"] / ok[peer]["tokens_per_s_per_gpu"]
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    device = torch.cuda.get_device_name(0)
    print(f"\n{args.config} mb {args.mb} accum {args.accum} ckpt {args.ckpt}{' compile' if args.compile else ''}"
          f"{f' offload={args.offload}' if args.offload else ''}"
          f"{f' offload_fraction={args.offload_fraction}' if args.offload and args.offload_fraction < 1 else ''}"
          f"{f' speculate={args.speculate}' if args.speculate else ''}"
          f"{' no-guard' if args.no_guard else ''}{f' clip={args.clip}' if args.clip else ''}, {device} x{nproc}, torch {torch.__version__}, {date}")
    if matmul is not None:
        print(f"bf16 matmul rate measured: {matmul['tflops']:.0f} TFLOP/s")
    print(f"{'impl':6} {'gpus':>4} {'step ms':>8} {'tok/s/GPU':>10} {'MFU':>6} {'peak GiB':>9} {'vs plain':>8} {'vs fsdp2':>8}")
    for r in rows:
        if r.get("failed"):
            print(f"{r['impl']:6} failed")
            continue
        print(f"{r['impl']:6} {r['gpus']:>4} {r['step_ms']:>8.1f} {r['tokens_per_s_per_gpu']:>10,.0f} {r['mfu']:>6.1%} "
              f"{r['peak_gib']:>9.1f} {r.get('vs_plain', float('nan')):>8.3f} {r.get('vs_fsdp2', float('nan')):>8.3f}")
        if "cpu_adam_ms" in r:
            print(f"{'':6} CPU Adam {r['cpu_adam_ms']:.0f} ms per step (inside the kernel calls)")
    if args.out:
        with open(args.out, "a") as f:
            for r in rows:
                r.update(config=args.config, mb=args.mb, accum=args.accum, ckpt=args.ckpt, compile=args.compile, offload=args.offload,
                         offload_fraction=args.offload_fraction if args.offload else None,
                         speculate=args.speculate if args.offload else None,
                         guard=not args.no_guard, clip=args.clip, device=device, torch=torch.__version__, date=date)
                f.write(json.dumps(r) + "\n")
    return 0 if all(not r.get("failed") for r in rows) else 1


# --- the workers ------------------------------------------------------------------------------
def _worker(args: argparse.Namespace) -> None:
    import torch

    sys.path.insert(0, str(HERE))
    from runners import RUNNERS, measure_matmul, time_steps  # noqa: PLC0415 - a worker-only import

    local = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local)
    if args.worker == "matmul":
        result: dict[str, Any] = {"tflops": measure_matmul(torch.device("cuda", local))}
    else:
        result = time_steps(RUNNERS[args.worker], args)
    if int(os.environ.get("RANK", "0")) == 0:
        Path(args.result).write_text(json.dumps(result))


def _worker_argv(args: argparse.Namespace) -> list[str]:
    """The parent's settings for a worker (never ``--out``: only the parent writes that file)."""
    argv = ["--config", args.config, "--mb", str(args.mb), "--accum", str(args.accum), "--ckpt", args.ckpt,
            "--steps", str(args.steps), "--warmup", str(args.warmup), "--impls", args.impls]
    return argv + (["--offload", args.offload, "--offload-fraction", str(args.offload_fraction),
             "--speculate", str(args.speculate)] if args.offload else []) + ["--no-guard"] * args.no_guard + ["--compile"] * args.compile + (
        ["--clip", str(args.clip)] if args.clip else [])


def main(argv: list[str] | None = None) -> int:
    args = _options(argv)
    if args.worker is not None:
        _worker(args)
        return 0
    return _parent(args, _worker_argv(args))


if __name__ == "__main__":
    raise SystemExit(main())
