"""A Llama-style decoder written with the BMTrain API.

RMSNorm, rotary position embeddings, a SwiGLU feed-forward, grouped-query attention through
``F.scaled_dot_product_attention``, no biases, an untied output layer. As in the GPT example,
each layer is a ZeRO-3, activation-checkpointed ``bmt.Block``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

import bmtrain as bmt

from .layers import Embedding, Linear, RMSNorm

__all__ = ["LlamaConfig", "Llama", "rotary_tables", "apply_rotary"]


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    block_size: int = 128  # longest sequence the rotary tables are meant for
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 2  # grouped-query attention: n_head // n_kv_head query heads share a k/v head
    n_embd: int = 128
    ffn_dim: int | None = None  # default: 8/3 * n_embd rounded up to a multiple of 32
    rope_theta: float = 10000.0
    dtype: torch.dtype = torch.float32
    use_checkpoint: bool = True
    pipeline: bool = False

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_head % self.n_kv_head != 0:
            raise ValueError(f"n_head ({self.n_head}) must be divisible by n_kv_head ({self.n_kv_head})")
        if (self.n_embd // self.n_head) % 2 != 0:
            raise ValueError(f"head size ({self.n_embd // self.n_head}) must be even for rotary embeddings")

    @property
    def hidden_ffn(self) -> int:
        if self.ffn_dim is not None:
            return self.ffn_dim
        return (8 * self.n_embd // 3 + 31) // 32 * 32


def rotary_tables(T: int, head_size: int, theta: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos`` and ``sin`` of the rotary angles, each ``(T, head_size // 2)``, in fp32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_size, 2, device=device, dtype=torch.float32) / head_size)
    angles = torch.outer(torch.arange(T, device=device, dtype=torch.float32), inv_freq)  # (T, hs/2)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs ``(x[..., 2i], x[..., 2i+1])`` of ``x`` ``(B, nh, T, hs)`` by the position's angle."""
    x32 = x.float().reshape(*x.shape[:-1], -1, 2)  # (B, nh, T, hs/2, 2)
    a, b = x32[..., 0], x32[..., 1]  # (B, nh, T, hs/2)
    rotated = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1)  # (B, nh, T, hs/2, 2)
    return rotated.flatten(-2).to(x.dtype)  # (B, nh, T, hs)


class Attention(bmt.DistributedModule):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head = cfg.n_head, cfg.n_kv_head
        self.head_size = cfg.n_embd // cfg.n_head
        self.theta = cfg.rope_theta
        self.wq = Linear(cfg.n_embd, cfg.n_head * self.head_size, bias=False, dtype=cfg.dtype)
        self.wk = Linear(cfg.n_embd, cfg.n_kv_head * self.head_size, bias=False, dtype=cfg.dtype)
        self.wv = Linear(cfg.n_embd, cfg.n_kv_head * self.head_size, bias=False, dtype=cfg.dtype)
        self.wo = Linear(cfg.n_head * self.head_size, cfg.n_embd, bias=False, dtype=cfg.dtype,
                         std=0.02 / (2 * cfg.n_layer) ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        hs = self.head_size
        q = self.wq(x).view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = self.wk(x).view(B, T, self.n_kv_head, hs).transpose(1, 2)  # (B, nkv, T, hs)
        v = self.wv(x).view(B, T, self.n_kv_head, hs).transpose(1, 2)  # (B, nkv, T, hs)
        cos, sin = rotary_tables(T, hs, self.theta, x.device)  # (T, hs/2) each
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        repeat = self.n_head // self.n_kv_head
        k = k.repeat_interleave(repeat, dim=1)  # (B, nh, T, hs)
        v = v.repeat_interleave(repeat, dim=1)  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        out: torch.Tensor = self.wo(y.transpose(1, 2).reshape(B, T, C))  # (B, T, C)
        return out


class SwiGLU(bmt.DistributedModule):
    """``w2(silu(w1 x) * w3 x)``."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.w1 = Linear(cfg.n_embd, cfg.hidden_ffn, bias=False, dtype=cfg.dtype)
        self.w3 = Linear(cfg.n_embd, cfg.hidden_ffn, bias=False, dtype=cfg.dtype)
        self.w2 = Linear(cfg.hidden_ffn, cfg.n_embd, bias=False, dtype=cfg.dtype, std=0.02 / (2 * cfg.n_layer) ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        out: torch.Tensor = self.w2(F.silu(self.w1(x)) * self.w3(x))  # hidden (B, T, ffn)
        return out


class LlamaLayer(bmt.DistributedModule):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.n_embd, cfg.dtype)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.n_embd, cfg.dtype)
        self.feed_forward = SwiGLU(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        x = x + self.attention(self.attention_norm(x))
        x = x + self.feed_forward(self.ffn_norm(x))
        return x


class Llama(bmt.DistributedModule):
    """Token ids ``(B, T)`` to next-token logits ``(B, T, vocab)``."""

    vocab_parallel = False  # whole-vocabulary logits: written without tensor-parallel layers

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = Embedding(cfg.vocab_size, cfg.n_embd, cfg.dtype)
        mode = "PIPE" if cfg.pipeline else "BLOCK"
        blocks = [bmt.Block(LlamaLayer(cfg), use_checkpoint=cfg.use_checkpoint, mode=mode) for _ in range(cfg.n_layer)]
        self.layers = bmt.PipelineTransformerBlockList(blocks) if cfg.pipeline else bmt.TransformerBlockList(blocks)
        self.norm = RMSNorm(cfg.n_embd, cfg.dtype)
        self.output = Linear(cfg.n_embd, cfg.vocab_size, bias=False, dtype=cfg.dtype)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok_embeddings(idx)  # (B, T, C)
        x = self.layers(x)  # (B, T, C)
        logits: torch.Tensor = self.output(self.norm(x))  # (B, T, vocab)
        return logits
