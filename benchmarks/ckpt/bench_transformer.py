"""One transformer training step: bmt Blocks in a TransformerBlockList vs PyTorch FSDP2 ``fully_shard``.

Same model (pre-LN attention + MLP layers, bf16 parameters), same data, same SGD step, both with
activation checkpointing and parameters resharded after forward (ZeRO-3), in the same run.
Launch on one host with several GPUs:

    torchrun --nproc_per_node 2 benchmarks/ckpt/bench_transformer.py [--dim 2048 --layers 16 ...]

Prints, on rank 0, the median step time, tokens per second and peak memory of each.
"""

from __future__ import annotations

import argparse
import gc
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class Setup:
    dim: int
    heads: int
    layers: int
    seq: int
    batch: int
    steps: int
    warmup: int


class Layer(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + self.proj(y)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class Checkpointed(nn.Module):
    """FSDP2's side: a layer under non-reentrant activation checkpointing."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = checkpoint(self.layer, x, use_reentrant=False)
        return out


def _layers(s: Setup, device: torch.device) -> list[nn.Module]:
    torch.manual_seed(0)
    return [Layer(s.dim, s.heads).to(device, torch.bfloat16) for _ in range(s.layers)]


def _time(step: Callable[[], None], s: Setup) -> tuple[float, float]:
    """Median step time (s) and peak memory (GiB) over ``s.steps`` steps after ``s.warmup``."""
    for _ in range(s.warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(s.steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times), torch.cuda.max_memory_allocated() / 2**30


def bench_bmt(s: Setup, x: torch.Tensor) -> tuple[float, float]:
    from bmt_ckpt import Block, TransformerBlockList
    from bmt_zero import DistributedParameter

    blocks = []
    for layer in _layers(s, x.device):
        for sub in layer.modules():
            for name, p in list(sub._parameters.items()):
                if p is not None:
                    sub._parameters[name] = DistributedParameter(p.detach())
        blocks.append(Block(layer, use_checkpoint=True, zero_level=3))
    model = TransformerBlockList(blocks)
    flat = [p for b in model for _, ps in b.grouped_parameters() for p in ps]
    opt = torch.optim.SGD(flat, lr=1e-4, foreach=True)

    def step() -> None:
        model(x).float().square().mean().backward()
        opt.step()
        opt.zero_grad()

    return _time(step, s)


def bench_fsdp2(s: Setup, x: torch.Tensor) -> tuple[float, float]:
    from torch.distributed.fsdp import fully_shard

    model = nn.Sequential(*(Checkpointed(layer) for layer in _layers(s, x.device)))
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, foreach=True)

    def step() -> None:
        model(x).float().square().mean().backward()
        opt.step()
        opt.zero_grad()

    return _time(step, s)


def add_model_args(ap: argparse.ArgumentParser) -> None:
    """The model and batch options (shared with scripts/peak_memory.py)."""
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=4)


def main() -> None:
    import bmt_comm

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(ap)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    s = Setup(**vars(ap.parse_args()))
    bmt_comm.init_distributed()
    ctx = bmt_comm.get_context()
    if ctx.device.type != "cuda":
        raise SystemExit("this benchmark needs GPUs (launch with torchrun on a GPU host)")
    torch.manual_seed(1 + ctx.rank)
    x = torch.randn(s.batch, s.seq, s.dim, device=ctx.device, dtype=torch.bfloat16)
    params = s.layers * (12 * s.dim * s.dim + 13 * s.dim)
    tokens = s.batch * s.seq * ctx.world_size
    results = {}
    for name, bench in (("bmt Block (ZeRO-3 + ckpt)", bench_bmt), ("FSDP2 fully_shard + ckpt", bench_fsdp2)):
        results[name] = bench(s, x)
        gc.collect()  # Blocks reference their neighbours: free the first model before the second runs
        torch.cuda.empty_cache()
    if ctx.rank == 0:
        gpu = torch.cuda.get_device_name(ctx.device)
        print(f"{ctx.world_size} x {gpu}; {s.layers} layers, dim {s.dim}, {params / 1e6:.0f}M params (bf16), "
              f"{s.batch} x {s.seq} tokens per rank, backend {ctx.backend}")
        print(f"{'':28s} {'step ms':>9s} {'tokens/s':>12s} {'peak GiB':>9s}")
        for name, (sec, mem) in results.items():
            print(f"{name:28s} {sec * 1e3:9.1f} {tokens / sec:12,.0f} {mem:9.2f}")
    bmt_comm.destroy()


if __name__ == "__main__":
    main()
