# mypy: disable-error-code="untyped-decorator,no-untyped-def"
"""Triton kernels of the fused cross-entropy (imported only when Triton is present).

Forward: programs over (row, vocabulary split); each streams its columns in blocks with an
online max / sum-exp in fp32 and writes three floats; the splits are merged in torch. No fp32
copy of the logits exists at any time. Backward: one program per (row, block) recomputes the
softmax from the saved per-row log-sum-exp and writes the gradient in the logits' dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._triton_support import on_device
from .stats import RowStats

__all__ = ["row_stats", "write_grad", "MAX_BLOCK", "TARGET_PROGRAMS"]

MAX_BLOCK = 4096  # columns a program holds at once (fp32 registers)
TARGET_PROGRAMS = 1024  # forward splits the vocabulary until rows x splits reaches this


@triton.jit
def _stats_kernel(
    x_ptr, stride_x, w_ptr, m_ptr, s_ptr, wx_ptr, n_cols, split_cols, n_splits,
    HAS_WEIGHT: tl.constexpr, SMOOTH: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    c0 = split * split_cols
    c1 = tl.minimum(c0 + split_cols, n_cols)
    base = x_ptr + row * stride_x
    # 0-d fp32 accumulators made by reductions: the same type as the loop's updates
    m = tl.max(tl.full([BLOCK], float("-inf"), tl.float32), 0)
    s = tl.sum(tl.zeros([BLOCK], tl.float32), 0)
    wx = tl.sum(tl.zeros([BLOCK], tl.float32), 0)
    for start in range(c0, c1, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < c1
        x = tl.load(base + cols, mask=mask, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 0))
        # a split that is -inf so far has sum 0: shift by 0 instead of -inf - -inf = nan
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_use) + tl.sum(tl.exp(x - m_use), 0)
        m = m_new
        if SMOOTH:
            xz = tl.where(mask, x, 0.0)
            if HAS_WEIGHT:
                xz = xz * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            wx += tl.sum(xz, 0)
    out = row * n_splits + split
    tl.store(m_ptr + out, m)
    tl.store(s_ptr + out, s)
    if SMOOTH:
        tl.store(wx_ptr + out, wx)


@triton.jit
def _grad_kernel(
    x_ptr, stride_x, g_ptr, stride_g, lse_ptr, t_ptr, cp_ptr, ct_ptr, cw_ptr, w_ptr, n_cols,
    HAS_WEIGHT: tl.constexpr, SMOOTH: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    lse = tl.load(lse_ptr + row)
    t = tl.load(t_ptr + row)
    g = tl.exp(x - lse) * tl.load(cp_ptr + row)
    g = tl.where(cols == t, g - tl.load(ct_ptr + row), g)
    if SMOOTH:
        cw = tl.load(cw_ptr + row)
        if HAS_WEIGHT:
            g = g - cw * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        else:
            g = g - cw
    tl.store(g_ptr + row * stride_g + cols, g.to(g_ptr.dtype.element_ty), mask=mask)


def _block(n_cols: int) -> int:
    return max(16, min(MAX_BLOCK, int(triton.next_power_of_2(n_cols))))


def _warps(block: int) -> int:
    return 8 if block >= 2048 else 4


def row_stats(logits: torch.Tensor, weight: torch.Tensor | None, smoothing: bool) -> RowStats:
    """Per row: max, sum of exp(x - max) and (when smoothing) sum of w_c * x_c, in fp32."""
    n, c = logits.shape
    if n == 0:
        empty = logits.new_empty(0, dtype=torch.float32)
        return RowStats(empty, empty, empty if smoothing else None)
    block = _block(c)
    blocks = triton.cdiv(c, block)
    splits = max(1, min(blocks, triton.cdiv(TARGET_PROGRAMS, max(n, 1))))
    split_cols = triton.cdiv(blocks, splits) * block
    splits = triton.cdiv(c, split_cols)
    dev = logits.device
    m = torch.empty((n, splits), dtype=torch.float32, device=dev)
    s = torch.empty((n, splits), dtype=torch.float32, device=dev)
    wx = torch.empty((n, splits), dtype=torch.float32, device=dev) if smoothing else m
    with on_device(logits):
        _stats_kernel[(n, splits)](
            logits, logits.stride(0), weight if weight is not None else m, m, s, wx,
            c, split_cols, splits,
            HAS_WEIGHT=weight is not None, SMOOTH=smoothing, BLOCK=block, num_warps=_warps(block),
        )
    if splits == 1:
        return RowStats(m[:, 0], s[:, 0], wx[:, 0] if smoothing else None)
    mx = m.amax(dim=1)
    m_use = torch.where(torch.isneginf(mx), torch.zeros_like(mx), mx)
    total = (s * torch.exp(m - m_use[:, None])).sum(dim=1)
    return RowStats(mx, total, wx.sum(dim=1) if smoothing else None)


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
    """``out[i, c] = coef_p[i] * exp(x[i, c] - lse[i]) - coef_t[i] * [c == t_i] - coef_w[i] * w_c``."""
    n, c = logits.shape
    if n == 0:
        return
    block = _block(c)
    with on_device(logits):
        _grad_kernel[(n, triton.cdiv(c, block))](
            logits, logits.stride(0), out, out.stride(0), lse, target_local, coef_p, coef_t,
            coef_w if coef_w is not None else coef_p, weight if weight is not None else coef_p, c,
            HAS_WEIGHT=weight is not None, SMOOTH=coef_w is not None, BLOCK=block, num_warps=_warps(block),
        )
