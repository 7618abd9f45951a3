"""What the cross-entropy kernels hand to the autograd function."""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["RowStats"]


class RowStats(NamedTuple):
    """Per-row statistics of the logits (fp32, shape ``(N,)``), before any tensor-parallel merge."""

    max: torch.Tensor  # max_c x[i, c] (-inf for an all -inf row)
    sumexp: torch.Tensor  # sum_c exp(x[i, c] - max)
    wsum: torch.Tensor | None  # sum_c w_c * x[i, c] (w = 1 without weight); only for label smoothing
