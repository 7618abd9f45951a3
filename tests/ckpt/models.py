"""A small transformer for the Block tests (nanoGPT-style), and helpers shared by the tests.

The same plain torch model is built on every rank from one seed; one copy is trained in plain
torch on the whole batch (the reference), the other is converted to DistributedParameters and
wrapped in Blocks, and trained on this rank's rows of the batch.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Config:
    dim: int = 16
    heads: int = 2
    hidden: int = 40
    layers: int = 3
    seq: int = 5
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by heads ({self.heads})")


class Layer(nn.Module):
    """Pre-LayerNorm attention + MLP. ``forward(x, mask=None, *, scale=1.0)``; ``scale`` is keyword-only."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.ln1 = nn.LayerNorm(cfg.dim)
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.ln2 = nn.LayerNorm(cfg.dim)
        self.fc1 = nn.Linear(cfg.dim, cfg.hidden)
        self.fc2 = nn.Linear(cfg.hidden, cfg.dim, bias=False)
        self.drop = nn.Dropout(cfg.dropout)
        self.register_buffer("pos", torch.linspace(-0.1, 0.1, cfg.seq).unsqueeze(-1))  # (T, 1), persistent
        self.register_buffer("scratch", torch.zeros(1), persistent=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, *, scale: float = 1.0) -> torch.Tensor:
        B, T, C = x.shape
        nh = self.cfg.heads
        h = self.ln1(x + self.pos[:T])
        q, k, v = self.qkv(h).split(C, dim=2)
        q, k, v = (t.view(B, T, nh, C // nh).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(C // nh)
        if mask is not None:
            att = att.masked_fill(~mask, float("-inf"))
        att = self.drop(F.softmax(att, dim=-1))
        y = (att @ v).transpose(1, 2).reshape(B, T, C)
        x = x + self.drop(self.proj(y)) * scale
        return x + self.drop(self.fc2(F.gelu(self.fc1(self.ln2(x)))))


class TwoStateLayer(nn.Module):
    """Two hidden states of different shapes: ``(x, gate) -> (x', gate')`` with gate ``(B, T)``."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.layer = Layer(cfg)
        self.gate = nn.Linear(cfg.dim, 1)

    def forward(self, x: torch.Tensor, gate: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.layer(x * torch.sigmoid(gate).unsqueeze(-1), mask)
        return out, gate + self.gate(out).squeeze(-1)


def make_layers(cfg: Config, seed: int, kind: type[nn.Module] = Layer) -> nn.ModuleList:
    torch.manual_seed(seed)
    return nn.ModuleList(kind(cfg) for _ in range(cfg.layers))  # type: ignore[call-arg]


def causal_mask(T: int) -> torch.Tensor:
    return torch.tril(torch.ones(T, T, dtype=torch.bool))


def distribute_(module: nn.Module) -> nn.Module:
    """Every parameter becomes a DistributedParameter (same values, same requires_grad), in place."""
    from bmt_zero import DistributedParameter

    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None and not isinstance(p, DistributedParameter):
                sub._parameters[name] = DistributedParameter(p.detach(), requires_grad=p.requires_grad)
    return module


def plain_copy(module: nn.Module) -> nn.Module:
    return copy.deepcopy(module)


def batch(cfg: Config, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cfg.seq, cfg.dim, generator=gen)
    target = torch.randn(n, cfg.seq, cfg.dim, generator=gen)
    return x, target


def rows(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's contiguous share of the batch (dim 0 must divide evenly)."""
    n = t.shape[0] // world
    return t[rank * n : (rank + 1) * n]


def holds_no_gather(storage: object) -> bool:
    """A Block's storage keeps nothing gathered: released, or in place (over a group of one the
    shard is the full buffer, so there is nothing to gather or release)."""
    from bmt_zero.flat_storage import BufferState, FlatStorage

    assert isinstance(storage, FlatStorage)
    return storage.in_place or storage.state is BufferState.RELEASED
