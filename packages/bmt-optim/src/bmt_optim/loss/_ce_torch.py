"""Plain-torch cross-entropy pieces for CPU (and CUDA without Triton).

The logits are read in blocks of rows x columns, each upcast to fp32 on its own, so the fp32
temporaries stay a few MiB whatever the vocabulary size.
"""

from __future__ import annotations

import torch

from .stats import RowStats

__all__ = ["row_stats", "write_grad"]

_COLS = 4096  # columns per block
_ELEMS = 1 << 20  # fp32 elements per block (4 MiB)


def _blocks(n_rows: int, n_cols: int) -> list[tuple[slice, slice]]:
    cols = min(n_cols, _COLS)
    rows = max(1, _ELEMS // max(cols, 1))
    return [
        (slice(r, min(r + rows, n_rows)), slice(c, min(c + cols, n_cols)))
        for r in range(0, n_rows, rows)
        for c in range(0, n_cols, cols)
    ]


def row_stats(logits: torch.Tensor, weight: torch.Tensor | None, smoothing: bool) -> RowStats:
    """Per row: max, sum of exp(x - max) and (when smoothing) sum of w_c * x_c, in fp32."""
    n, c = logits.shape
    dev = logits.device
    m = torch.full((n,), float("-inf"), dtype=torch.float32, device=dev)
    s = torch.zeros(n, dtype=torch.float32, device=dev)
    wx = torch.zeros(n, dtype=torch.float32, device=dev) if smoothing else None
    for rows, cols in _blocks(n, c):
        x = logits[rows, cols].float()
        m_old = m[rows]
        m_new = torch.maximum(m_old, x.amax(dim=1))
        # a row that is -inf so far has sum 0: shift by 0 instead of -inf - -inf = nan
        m_use = torch.where(torch.isneginf(m_new), torch.zeros_like(m_new), m_new)
        s[rows] = s[rows] * torch.exp(m_old - m_use) + torch.exp(x - m_use[:, None]).sum(dim=1)
        m[rows] = m_new
        if wx is not None:
            wx[rows] += x.sum(dim=1) if weight is None else x @ weight[cols]
    return RowStats(m, s, wx)


def write_grad(
    logits: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    target_local: torch.Tensor,
    coef_p: torch.Tensor,
    coef_t: torch.Tensor,
    coef_w: torch.Tensor | None,
    weight: torch.Tensor | None,
) -> None:
    """``out[i, c] = coef_p[i] * exp(x[i, c] - lse[i]) - coef_t[i] * [c == t_i] - coef_w[i] * w_c``.

    ``target_local`` is the target's column in this block of the vocabulary, or -1. ``out`` may
    be ``logits`` itself: each block is read in full before it is overwritten.
    """
    n, c = logits.shape
    rows_all = torch.arange(n, device=logits.device)
    for rows, cols in _blocks(n, c):
        x = logits[rows, cols].float()
        g = torch.exp(x - lse[rows, None]) * coef_p[rows, None]
        if coef_w is not None:
            w = weight[cols] if weight is not None else torch.ones(1, dtype=torch.float32, device=x.device)
            g = g - coef_w[rows, None] * w[None, :]
        t = target_local[rows] - cols.start
        hit = (t >= 0) & (t < g.shape[1])
        r = rows_all[rows][hit] - rows.start
        g[r, t[hit]] -= coef_t[rows][hit]
        out[rows, cols] = g.to(out.dtype)
