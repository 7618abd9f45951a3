"""A GPT-2 style decoder written with the BMTrain API, tensor-parallel capable (nanoGPT's shape).

Every transformer layer is a ``bmt.Block``: its parameters live sharded in one flat buffer,
are gathered just before the layer runs and released after, and its activations are
recomputed in backward (``use_checkpoint``). The layers sit in a ``bmt.TransformerBlockList``
(or a ``bmt.PipelineTransformerBlockList`` when the run is pipelined), which overlaps one
layer's gradient reduce-scatter with the next layer's backward.

The linear layers and the embedding come from ``bmt.nn``, so the same model runs with tensor
parallelism (``init_distributed(tp_size=...)``), as BMTrain's own tensor-parallel example does:
hidden states are split along dim 0 (the batch) over the tensor-parallel group; a
``ColumnParallelLinear`` gathers them and computes its slice of the output features (here: its
heads), a ``RowParallelLinear`` sums the partial outputs and scatters the rows back, and the
tied ``VPEmbedding`` gives each rank the logits of its slice of the vocabulary for
``FusedCrossEntropy(parallel=True)``. With ``tp_size=1`` every collective is skipped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

import bmtrain as bmt

from .layers import LayerNorm

__all__ = ["GPTConfig", "GPT"]


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int  # a multiple of the tensor-parallel size
    block_size: int = 128  # longest sequence (learned position embeddings)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dtype: torch.dtype = torch.float32
    use_checkpoint: bool = True  # recompute each layer's activations in backward
    pipeline: bool = False  # layers go in a PipelineTransformerBlockList (init_distributed(pipe_size=...))

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


class CausalSelfAttention(bmt.DistributedModule):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head, self.head_size = cfg.n_head, cfg.n_embd // cfg.n_head
        C = cfg.n_embd
        # column-parallel: tp rank r computes heads [r * nh/tp, (r+1) * nh/tp) for every sequence
        self.q = bmt.nn.ColumnParallelLinear(C, C, bias=True, dtype=cfg.dtype)
        self.k = bmt.nn.ColumnParallelLinear(C, C, bias=True, dtype=cfg.dtype)
        self.v = bmt.nn.ColumnParallelLinear(C, C, bias=True, dtype=cfg.dtype)
        self.proj = bmt.nn.RowParallelLinear(C, C, bias=True, dtype=cfg.dtype)  # sums the heads' parts

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B/tp, T, C) -> (B/tp, T, C)
        q, k, v = self.q(x), self.k(x), self.v(x)  # (B, T, C/tp) each: every sequence, local heads
        B, T, Ct = q.shape
        q = q.view(B, T, Ct // self.head_size, self.head_size).transpose(1, 2)  # (B, nh/tp, T, hs)
        k = k.view(B, T, Ct // self.head_size, self.head_size).transpose(1, 2)  # (B, nh/tp, T, hs)
        v = v.view(B, T, Ct // self.head_size, self.head_size).transpose(1, 2)  # (B, nh/tp, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh/tp, T, hs)
        y = y.transpose(1, 2).reshape(B, T, Ct)  # (B, T, C/tp)
        out: torch.Tensor = self.proj(y)  # (B/tp, T, C)
        return out


class MLP(bmt.DistributedModule):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.fc = bmt.nn.ColumnParallelLinear(cfg.n_embd, 4 * cfg.n_embd, bias=True, dtype=cfg.dtype)
        self.proj = bmt.nn.RowParallelLinear(4 * cfg.n_embd, cfg.n_embd, bias=True, dtype=cfg.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B/tp, T, C) -> (B/tp, T, C)
        h = F.gelu(self.fc(x), approximate="tanh")  # (B, T, 4C/tp)
        out: torch.Tensor = self.proj(h)  # (B/tp, T, C)
        return out


class GPTLayer(bmt.DistributedModule):
    """Pre-norm transformer layer: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(cfg.n_embd, cfg.dtype)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = LayerNorm(cfg.n_embd, cfg.dtype)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B/tp, T, C) -> (B/tp, T, C)
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(bmt.DistributedModule):
    """This tp rank's token ids ``(B/tp, T)`` to the logits of the whole tp group's ``B``
    sequences over this rank's slice of the vocabulary, ``(B, T, vocab/tp)``."""

    vocab_parallel = True  # logits for FusedCrossEntropy(parallel=True), targets of all B sequences

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = bmt.nn.VPEmbedding(cfg.vocab_size, cfg.n_embd, dtype=cfg.dtype, init_std=0.02)
        self.wpe = bmt.DistributedParameter(
            torch.empty(cfg.block_size, cfg.n_embd, dtype=cfg.dtype, device="meta"),
            init_method=bmt.ParameterInitializer(torch.nn.init.normal_, mean=0.0, std=0.02),
        )
        mode = "PIPE" if cfg.pipeline else "BLOCK"
        blocks = [bmt.Block(GPTLayer(cfg), use_checkpoint=cfg.use_checkpoint, mode=mode) for _ in range(cfg.n_layer)]
        self.layers = bmt.PipelineTransformerBlockList(blocks) if cfg.pipeline else bmt.TransformerBlockList(blocks)
        self.ln_f = LayerNorm(cfg.n_embd, cfg.dtype)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        if T > self.cfg.block_size:
            raise ValueError(f"sequence length ({T}) exceeds block_size ({self.cfg.block_size})")
        x = self.wte(idx) + self.wpe[:T]  # (B/tp, T, C)
        x = self.layers(x)  # (B/tp, T, C)
        logits: torch.Tensor = self.wte(self.ln_f(x), projection=True)  # (B/tp, tp*T, vocab/tp), tied weights
        return logits
