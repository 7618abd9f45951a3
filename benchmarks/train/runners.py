"""The three ways of training the yardstick (run inside torchrun workers by ``bench_train.py``).

Each runner builds the model on this rank's GPU from the same seed and returns a ``step()`` that
does ``accum`` forward/backward passes and one optimizer step.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts, noop_context_fn
from yardstick import CONFIGS, Config, Yardstick, flops_per_token, parameter_count, rotary_tables

Step = Callable[[], None]
LR = 1e-4


class Checkpointed(nn.Module):
    """A layer under non-reentrant activation checkpointing (plain torch and FSDP2), full or
    selective (torch's selective checkpointing with bmt's preset policy)."""

    def __init__(self, layer: nn.Module, selective: bool = False) -> None:
        super().__init__()
        self.layer = layer
        self.context_fn: Callable[[], Any] = noop_context_fn
        if selective:  # the policy bmt's checkpoint_policy="matmul_attention" applies
            from bmt_ckpt.block.options import resolve_checkpoint_policy  # noqa: PLC0415

            self.context_fn = functools.partial(
                create_selective_checkpoint_contexts, resolve_checkpoint_policy("matmul_attention")
            )

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = checkpoint(self.layer, x, cos, sin, use_reentrant=False, context_fn=self.context_fn)
        return out


def _build(cfg: Config, dtype: torch.dtype, ckpt: str, compile: bool = False) -> Yardstick:
    """The yardstick on this GPU; each layer checkpointed as ``ckpt`` says and, with
    ``compile``, compiled in place (checkpointing inside the compiled region, as torchtitan does)."""
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Yardstick(cfg).to(dtype)
    for i, layer in enumerate(model.layers):
        wrapped = layer if ckpt == "none" else Checkpointed(layer, selective=ckpt == "selective")
        if compile:
            wrapped.compile()
        model.layers[i] = wrapped
    return model


def _batches(cfg: Config, mb: int, accum: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator(device="cuda").manual_seed(1 + int(os.environ.get("RANK", "0")))
    ids = torch.randint(0, cfg.vocab, (accum, mb, cfg.seq + 1), device="cuda", generator=g)
    return [(ids[i, :, :-1], ids[i, :, 1:]) for i in range(accum)]


def plain(cfg: Config, args: argparse.Namespace) -> Step:
    model = _build(cfg, torch.bfloat16, args.ckpt, args.compile)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, fused=True)
    cos, sin = rotary_tables(cfg, torch.device("cuda"))
    batches = _batches(cfg, args.mb, args.accum)

    def step() -> None:
        for ids, targets in batches:
            (model(ids, targets, cos, sin) / len(batches)).backward()
        if args.clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def fsdp2(cfg: Config, args: argparse.Namespace) -> Step:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # noqa: PLC0415

    torch.distributed.init_process_group("nccl", device_id=torch.device("cuda", torch.cuda.current_device()))
    model = _build(cfg, torch.float32, args.ckpt, args.compile)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in model.layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, fused=True)
    cos, sin = rotary_tables(cfg, torch.device("cuda"))
    batches = _batches(cfg, args.mb, args.accum)

    def step() -> None:
        for i, (ids, targets) in enumerate(batches):
            model.set_requires_gradient_sync(i == len(batches) - 1)  # type: ignore[operator]
            (model(ids, targets, cos, sin) / len(batches)).backward()
        if args.clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip, foreach=True)  # DTensor gradients: one all-reduce
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def bmt_runner(cfg: Config, args: argparse.Namespace) -> Step:
    import bmtrain as bmt  # noqa: PLC0415

    bmt.init_distributed(seed=0)
    model = _build(cfg, torch.bfloat16, "none")
    policy = {"selective": "matmul_attention", "recompute_all": "recompute_all"}.get(args.ckpt)
    blocks = [
        bmt.Block(bmt.BMTrainModelWrapper(layer), use_checkpoint=args.ckpt != "none", checkpoint_policy=policy,
                  compile=args.compile)
        for layer in model.layers
    ]
    model.layers = bmt.TransformerBlockList(blocks)  # type: ignore[assignment]
    bmt.BMTrainModelWrapper(model)
    torch.cuda.empty_cache()
    if args.offload:
        opt = bmt.optim.AdamOffloadOptimizer(model.parameters(), lr=LR, overlap=args.offload in ("overlap", "eager"),
                                             delay_update=args.offload == "delayed",
                                             overlap_forward=args.offload == "lazy",
                                             offload_fraction=args.offload_fraction,
                                             speculative_fraction=args.speculate)
    else:
        opt = bmt.optim.AdamOptimizer(model.parameters(), lr=LR)
    manager = bmt.optim.OptimManager(loss_scale=None, skip_nonfinite=not args.no_guard)
    manager.add_optimizer(opt)
    cos, sin = rotary_tables(cfg, torch.device("cuda"))
    batches = _batches(cfg, args.mb, args.accum)

    eager = args.offload in ("eager", "lazy")

    def step() -> None:
        for k, (ids, targets) in enumerate(batches):
            loss = model(ids, targets, cos, sin) / len(batches)
            # the last backward: each Block's CPU Adam starts when it is done (guarded or clipped:
            # its gradients are checked then, and every update starts at step())
            if eager and k == len(batches) - 1:
                with manager.update_during_backward():
                    manager.backward(loss)
            else:
                manager.backward(loss)
        if args.clip:
            manager.clip_grad_norm(opt.param_groups, max_norm=args.clip)
        manager.step()
        manager.zero_grad(set_to_none=True)  # as the peers' opt.zero_grad(set_to_none=True): no gradients between steps
        if args.offload and args.offload != "step":
            # (lazy: the last update that finished landing, the step before's: its Blocks land in this forward)
            cpu_adam_s.append(opt.cpu_update_seconds)  # type: ignore[union-attr]

    cpu_adam_s: list[float] = []

    def extra() -> dict[str, Any]:
        out: dict[str, Any] = {"cpu_adam_ms": statistics.median(cpu_adam_s[-args.steps:]) * 1e3} if cpu_adam_s else {}
        if args.speculate:
            s = opt.speculation  # type: ignore[union-attr]
            out["speculated"] = {"started": s.started, "kept": s.kept, "undone": s.undone}  # elements, all steps
        return out

    step.extra = extra  # type: ignore[attr-defined]
    return step


RUNNERS: dict[str, Callable[[Config, argparse.Namespace], Step]] = {"plain": plain, "fsdp2": fsdp2, "bmt": bmt_runner}


def time_steps(runner: Callable[[Config, argparse.Namespace], Step], args: argparse.Namespace) -> dict[str, Any]:
    """Median step time over ``args.steps`` after ``args.warmup``; peak memory over the timed steps."""
    cfg = CONFIGS[args.config]
    step = runner(cfg, args)
    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    tokens = args.mb * args.accum * cfg.seq  # per GPU per step
    tps = tokens / seconds
    tflops = tps * flops_per_token(cfg) / 1e12
    peak = torch.tensor([torch.cuda.max_memory_allocated()], device="cuda", dtype=torch.float64)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
    extra = getattr(step, "extra", None)
    return {
        **(extra() if extra is not None else {}),
        "impl": runner.__name__.replace("_runner", ""),
        "params": parameter_count(cfg),
        "gpus": world,
        "step_ms": seconds * 1e3,
        "step_ms_all": [t * 1e3 for t in times],
        "tokens_per_s_per_gpu": tps,
        "tflops_per_gpu": tflops,
        "mfu": tflops / 989.0,
        "peak_gib": peak.item() / 2**30,
    }


def measure_matmul(device: torch.device, n: int = 8192, reps: int = 50) -> float:
    """The bf16 dense matmul rate of this GPU in TFLOP/s (median of ``reps``)."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * n**3 / statistics.median(times) / 1e12
