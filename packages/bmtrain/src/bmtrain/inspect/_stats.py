"""Moments of tensors split over ranks, pooled exactly (no rank ever holds the whole tensor).

A tensor's statistics are carried as one row ``(count, mean, m2, min, max)`` where ``m2`` is the
sum of squared deviations from the mean. Rows of disjoint pieces pool without loss
(Chan et al.): the pooled ``m2`` adds each piece's ``m2`` and the spread of the piece means around
the pooled mean. Element-wise work runs in fp32 (whatever the tensor's dtype), pooling in fp64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from bmt_comm import Communicator

__all__ = ["ROW", "Moments", "local_row", "pool_rows", "gather_rows", "to_moments"]

ROW = 5  # count, mean, m2, min, max


@dataclass(frozen=True)
class Moments:
    count: int
    mean: float
    m2: float
    min: float
    max: float

    @property
    def std(self) -> float:
        """Sample standard deviation (``torch.std`` with its default correction of 1)."""
        if self.count <= 1:
            return math.nan
        return math.sqrt(max(self.m2, 0.0) / (self.count - 1))


def local_row(x: torch.Tensor | None) -> torch.Tensor:
    """The moments row of ``x`` (fp64, on ``x``'s device); an empty or missing tensor counts 0."""
    if x is None or x.numel() == 0:
        device = x.device if x is not None else torch.device("cpu")
        return torch.tensor([0.0, 0.0, 0.0, math.inf, -math.inf], dtype=torch.float64, device=device)
    x32 = x.detach().reshape(-1).to(torch.float32)
    mean = x32.mean()
    m2 = (x32 - mean).square().sum()
    count = torch.tensor([float(x32.numel())], dtype=torch.float64, device=x32.device)  # exact past 2**24
    return torch.cat([count, torch.stack([mean, m2, x32.min(), x32.max()]).to(torch.float64)])


def pool_rows(rows: torch.Tensor) -> torch.Tensor:
    """Pool ``(..., n, ROW)`` rows over dim ``-2`` into ``(..., ROW)``."""
    count = rows[..., 0]
    total = count.sum(-1)
    safe_total = total.clamp(min=1.0)
    mean = (count * rows[..., 1]).sum(-1) / safe_total
    spread = (count * (rows[..., 1] - mean.unsqueeze(-1)).square()).sum(-1)
    m2 = rows[..., 2].sum(-1) + spread
    return torch.stack([total, mean, m2, rows[..., 3].amin(-1), rows[..., 4].amax(-1)], dim=-1)


def gather_rows(rows: torch.Tensor, comm: Communicator) -> torch.Tensor:
    """All-gather ``(k, W)`` rows over ``comm`` into ``(comm.size, k, W)`` (on the CPU)."""
    src = rows.to(comm.device, torch.float64).contiguous()
    out = torch.empty((comm.size, *src.shape), dtype=src.dtype, device=comm.device)
    comm.all_gather(src, out)
    return out.cpu()


def to_moments(row: torch.Tensor) -> Moments:
    count, mean, m2, lo, hi = (float(v) for v in row.tolist())
    if count == 0:
        return Moments(0, math.nan, math.nan, math.nan, math.nan)
    return Moments(int(count), mean, m2, lo, hi)
