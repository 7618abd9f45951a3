"""The training run of one rank: the BMTrain training loop as users write it."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import torch

import bmtrain as bmt

from .data import CharCorpus
from .gpt import GPT, GPTConfig
from .llama import Llama, LlamaConfig
from .metrics import count_model_parameters, model_flops_utilization, peak_bf16_flops, peak_memory_gib
from .options import Precision, TrainOptions
from .run_metrics import MetricsWriter, Progress, StepRecord, peak_rss_gib

__all__ = ["RunResult", "run", "build_model"]


@dataclass(frozen=True)
class RunResult:
    first_loss: float
    final_loss: float
    steps: int
    tokens_per_s: float
    n_params: int
    checkpoint: str | None
    metrics: tuple[str, ...] = ()  # the files (and TensorBoard directory) of the run's metrics


def build_model(opts: TrainOptions, vocab_size: int, dtype: torch.dtype) -> torch.nn.Module:
    assert opts.layers and opts.hidden and opts.heads and opts.seq  # filled by opts.resolved()
    if opts.model == "gpt":
        # padded (as nanoGPT does) to a multiple of 64 that the tensor-parallel size divides
        padded = -(-vocab_size // math.lcm(64, opts.tp)) * math.lcm(64, opts.tp)
        return GPT(GPTConfig(
            vocab_size=padded, block_size=opts.seq, n_layer=opts.layers, n_head=opts.heads,
            n_embd=opts.hidden, dtype=dtype, use_checkpoint=opts.checkpointing, pipeline=opts.pipe > 1,
        ))
    return Llama(LlamaConfig(
        vocab_size=vocab_size, block_size=opts.seq, n_layer=opts.layers, n_head=opts.heads,
        n_kv_head=max(1, opts.heads // 2), n_embd=opts.hidden, dtype=dtype,
        use_checkpoint=opts.checkpointing, pipeline=opts.pipe > 1,
    ))


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def run(opts: TrainOptions) -> RunResult:
    """Initialise, train ``opts.steps`` steps, save; every rank calls it (collective)."""
    bmt.init_distributed(
        init_method=opts.init_method, seed=opts.seed, pipe_size=opts.pipe if opts.pipe > 1 else -1, tp_size=opts.tp,
        num_micro_batches=opts.micro_batches,
    )
    try:
        return _train(opts)
    finally:
        bmt.init.destroy()


def _train(opts: TrainOptions) -> RunResult:
    device = _device()
    opts = opts.resolved(device)
    assert opts.batch and opts.seq and opts.steps
    dtype = opts.precision.dtype(device)
    rank, world = bmt.rank(), bmt.world_size()

    corpus = CharCorpus.packaged()
    model = build_model(opts, corpus.vocab_size, dtype)
    bmt.init_parameters(model)  # same seed on every rank: identical values, each rank keeps its shard
    n_params = count_model_parameters(model, device)  # every pipeline stage's layers

    vocab_parallel = bool(getattr(model, "vocab_parallel", False))
    loss_fn = bmt.loss.FusedCrossEntropy(ignore_index=-100, parallel=vocab_parallel)
    adam = bmt.optim.AdamOffloadOptimizer if opts.offload else bmt.optim.AdamOptimizer
    optimizer = adam(model.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
    lr_scheduler = bmt.lr_scheduler.Cosine(
        optimizer, start_lr=opts.lr, warmup_iter=opts.warmup, end_iter=opts.steps, num_iter=0
    )
    # ZeRO sums gradients over ranks; dividing by the number of data-parallel batches makes them
    # means (a tensor-parallel group computes one batch, so it counts once)
    optim_manager = bmt.optim.OptimManager(
        loss_scale=2**15 if opts.precision is Precision.FP16 else None, grad_scale=world // (opts.pipe * opts.tp)
    )
    optim_manager.add_optimizer(optimizer, lr_scheduler)

    # each tensor-parallel group draws its own windows and each of its ranks feeds its share of
    # them; a pipeline gathers its ranks' inputs and hands each rank back its own outputs, so
    # from here it looks data-parallel either way
    tp_rank, tp_group = rank % opts.tp, rank // opts.tp
    gen = torch.Generator().manual_seed(opts.seed * 1000 + tp_group)
    peak = peak_bf16_flops(device)
    tokens_per_step = opts.batch * opts.seq * world // opts.tp

    bmt.print_rank(
        f"{opts.model}: {n_params / 1e6:.2f}M parameters ({n_params:,}), {opts.layers} layers, hidden {opts.hidden}, "
        f"{dtype}, {world} processes (pipeline {opts.pipe} x tensor parallel {opts.tp}) on {device.type}, "
        f"{opts.batch} x {opts.seq} tokens per step and data-parallel rank, {opts.steps} steps"
        + (", optimizer offloaded to the CPU" if opts.offload else "")
    )
    writer = MetricsWriter(opts.metrics_path, opts.overwrite) if rank == 0 and opts.metrics_path else None
    if writer is not None and writer.note():
        print(writer.note(), flush=True)
    progress = Progress(opts.steps, opts.log_every, enabled=rank == 0)
    first_loss = math.nan
    loss_value = math.nan
    start = time.perf_counter()
    step_start = start
    for step in range(opts.steps):
        x, y = corpus.batch(opts.batch, opts.seq, gen)  # (B, T) each
        x = x.chunk(opts.tp)[tp_rank].to(device)  # (B/tp, T): this rank's sequences
        y = y.to(device)  # (B, T): a vocab-parallel loss needs the whole group's targets

        optim_manager.zero_grad()
        lr, loss_scale, skipped = optimizer.param_groups[0]["lr"], optim_manager.loss_scale, optim_manager.skipped_steps
        logits = model(x)  # (B, T, vocab), or (B, T, vocab/tp) over this rank's vocabulary slice
        loss = loss_fn(logits.reshape(-1, logits.shape[-1]), y.view(-1))
        optim_manager.backward(loss)
        grad_norm = optim_manager.clip_grad_norm(optimizer.param_groups, max_norm=1.0)
        optim_manager.step()

        loss_value = bmt.sum_loss(loss).item()  # the mean over ranks
        if step == 0:
            first_loss = loss_value
        now = time.perf_counter()
        tok_s = tokens_per_step / (now - step_start)
        step_start = now
        if rank == 0:
            rec = StepRecord(
                step=step + 1, loss=loss_value, lr=float(lr), loss_scale=float(loss_scale),
                grad_norm=float(grad_norm.item()), skipped=optim_manager.skipped_steps > skipped,
                tokens_per_s=tok_s, mfu=model_flops_utilization(n_params, tok_s, world, peak),
                memory_gib=peak_memory_gib(device), rss_gib=peak_rss_gib(), elapsed_s=now - start,
            )
            progress.update(rec)
            if writer is not None:
                writer.write(rec)
    progress.close()
    elapsed = time.perf_counter() - start

    checkpoint = None
    if opts.save_path:
        if rank == 0:
            os.makedirs(os.path.dirname(os.path.abspath(opts.save_path)), exist_ok=True)
        bmt.save(model, opts.save_path)
        checkpoint = opts.save_path
    metrics = tuple(writer.close()) if writer is not None else ()
    mean_tok_s = tokens_per_step * opts.steps / elapsed
    bmt.print_rank(f"first loss: {first_loss:.4f}")
    bmt.print_rank(f"final loss: {loss_value:.4f}")
    bmt.print_rank(
        f"{opts.steps} steps in {elapsed:.1f} s, {mean_tok_s:,.0f} tokens/s"
        + (f", checkpoint saved to {checkpoint}" if checkpoint else "")
    )
    if metrics:
        bmt.print_rank("metrics: " + ", ".join(metrics))
    return RunResult(first_loss, loss_value, opts.steps, mean_tok_s, n_params, checkpoint, metrics)
