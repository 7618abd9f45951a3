"""A GPT-2 style decoder written with the BMTrain API (nanoGPT's shape, ZeRO-3 blocks).

Every transformer layer is a ``bmt.Block``: its parameters live sharded in one flat buffer,
are gathered just before the layer runs and released after, and its activations are
recomputed in backward (``use_checkpoint``). The layers sit in a ``bmt.TransformerBlockList``
(or a ``bmt.PipelineTransformerBlockList`` when the run is pipelined), which overlaps one
layer's gradient reduce-scatter with the next layer's backward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

import bmtrain as bmt

from .layers import Embedding, LayerNorm, Linear

__all__ = ["GPTConfig", "GPT"]


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int
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
        self.n_head = cfg.n_head
        self.qkv = Linear(cfg.n_embd, 3 * cfg.n_embd, bias=True, dtype=cfg.dtype)
        # GPT-2: residual projections scaled down by sqrt(2 * n_layer)
        self.proj = Linear(cfg.n_embd, cfg.n_embd, bias=True, dtype=cfg.dtype, std=0.02 / (2 * cfg.n_layer) ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        out: torch.Tensor = self.proj(y)
        return out


class MLP(bmt.DistributedModule):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.fc = Linear(cfg.n_embd, 4 * cfg.n_embd, bias=True, dtype=cfg.dtype)
        self.proj = Linear(4 * cfg.n_embd, cfg.n_embd, bias=True, dtype=cfg.dtype, std=0.02 / (2 * cfg.n_layer) ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        out: torch.Tensor = self.proj(F.gelu(self.fc(x), approximate="tanh"))
        return out


class GPTLayer(bmt.DistributedModule):
    """Pre-norm transformer layer: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(cfg.n_embd, cfg.dtype)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = LayerNorm(cfg.n_embd, cfg.dtype)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(bmt.DistributedModule):
    """Token ids ``(B, T)`` to next-token logits ``(B, T, vocab)``."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = Embedding(cfg.vocab_size, cfg.n_embd, cfg.dtype)
        self.wpe = bmt.DistributedParameter(
            torch.empty(cfg.block_size, cfg.n_embd, dtype=cfg.dtype, device="meta"),
            init_method=bmt.ParameterInitializer(torch.nn.init.normal_, mean=0.0, std=0.02),
        )
        mode = "PIPE" if cfg.pipeline else "BLOCK"
        blocks = [bmt.Block(GPTLayer(cfg), use_checkpoint=cfg.use_checkpoint, mode=mode) for _ in range(cfg.n_layer)]
        self.layers = bmt.PipelineTransformerBlockList(blocks) if cfg.pipeline else bmt.TransformerBlockList(blocks)
        self.ln_f = LayerNorm(cfg.n_embd, cfg.dtype)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        B, T = idx.shape
        if T > self.cfg.block_size:
            raise ValueError(f"sequence length ({T}) exceeds block_size ({self.cfg.block_size})")
        x = self.wte(idx) + self.wpe[:T]  # (B, T, C)
        x = self.layers(x)  # (B, T, C)
        logits: torch.Tensor = self.wte.projection(self.ln_f(x))  # (B, T, vocab)
        return logits
