"""The training yardstick, written once in plain torch: a Llama-style decoder.

RMSNorm, causal ``scaled_dot_product_attention`` with rotary embeddings, a SwiGLU feed-forward,
untied embedding and head, vocab 32000, sequence 2048, random tokens. Each runner (plain torch,
FSDP2, bmt) takes this module as it is and wraps it its own way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CONFIGS", "Config", "Layer", "Yardstick", "flops_per_token", "rotary_tables"]


@dataclass(frozen=True)
class Config:
    name: str
    dim: int
    layers: int
    heads: int  # of 128
    ffn: int
    vocab: int = 32000
    seq: int = 2048

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads


CONFIGS = {
    "1b": Config("1.26B", dim=2048, layers=22, heads=16, ffn=5632),
    "7b": Config("6.74B", dim=4096, layers=32, heads=32, ffn=11008),
    # a few seconds on any GPU: checks the script, not the library
    "tiny": Config("tiny", dim=256, layers=2, heads=2, ffn=512, vocab=1024, seq=256),
}


def parameter_count(cfg: Config, with_embedding: bool = True) -> int:
    layer = 4 * cfg.dim * cfg.dim + 3 * cfg.dim * cfg.ffn + 2 * cfg.dim
    n = cfg.layers * layer + cfg.dim + cfg.vocab * cfg.dim  # layers, final norm, head
    return n + cfg.vocab * cfg.dim if with_embedding else n


def flops_per_token(cfg: Config) -> float:
    """Training FLOPs per token: 6N (N without the input embedding) + 12 * L * d * seq (attention)."""
    return 6.0 * parameter_count(cfg, with_embedding=False) + 12.0 * cfg.layers * cfg.dim * cfg.seq


def rotary_tables(cfg: Config, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos``, ``sin`` of the rotary angles, each ``(seq, head_dim // 2)``, fp32."""
    hd = cfg.head_dim
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, hd, 2, device=device, dtype=torch.float32) / hd)
    angles = torch.outer(torch.arange(cfg.seq, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the halves ``(x1, x2)`` of ``x`` ``(B, nh, T, hd)`` by each position's angles."""
    x1, x2 = x.float().chunk(2, dim=-1)  # (B, nh, T, hd/2) each
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., C) -> (..., C)
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight


class Layer(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.heads, self.head_dim = cfg.heads, cfg.head_dim
        self.attention_norm = RMSNorm(cfg.dim)
        self.wqkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.ffn_norm = RMSNorm(cfg.dim)
        self.w13 = nn.Linear(cfg.dim, 2 * cfg.ffn, bias=False)
        self.w2 = nn.Linear(cfg.ffn, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        qkv = self.wqkv(self.attention_norm(x)).view(B, T, 3, self.heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, nh, T, hd) each
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hd)
        x = x + self.wo(y.transpose(1, 2).reshape(B, T, C))
        gate, up = self.w13(self.ffn_norm(x)).chunk(2, dim=-1)  # (B, T, ffn) each
        return x + self.w2(F.silu(gate) * up)


class Yardstick(nn.Module):
    """Token ids ``(B, T)`` and targets ``(B, T)`` to the mean next-token loss."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.embedding = nn.Embedding(cfg.vocab, cfg.dim)
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.layers))
        self.norm = RMSNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.vocab, bias=False)
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)

    def run_layers(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, cos, sin)
        return x

    def forward(self, ids: torch.Tensor, targets: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = self.run_layers(self.embedding(ids), cos, sin)
        logits = self.head(self.norm(x))  # (B, T, vocab)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
