# mypy: disable-error-code="untyped-decorator,no-untyped-def"
"""Triton kernel of the inf/nan check (imported only when Triton is present)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_support import on_device

__all__ = ["flag_non_finite"]

_BLOCK = 4096


@triton.jit
def _non_finite_kernel(x_ptr, n, flag_ptr, IS_FP64: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    if not IS_FP64:
        # half types compare in fp32 (exact, keeps inf/nan); fp64 stays: a cast would invent infs
        x = x.to(tl.float32)
    bad = (x != x) | (tl.abs(x) == float("inf"))
    n_bad = tl.sum(bad.to(tl.int32), 0)
    # only blocks that found something write: no atomics contend on the one flag
    tl.store(flag_ptr, 1, mask=n_bad > 0)


def flag_non_finite(flat: torch.Tensor, flag: torch.Tensor) -> None:
    """Set ``flag[0] = 1`` if the contiguous 1-D ``flat`` holds an inf or a nan (no sync)."""
    n = flat.numel()
    if n == 0:
        return
    with on_device(flat):
        _non_finite_kernel[(triton.cdiv(n, _BLOCK),)](
            flat, n, flag, IS_FP64=flat.dtype == torch.float64, BLOCK=_BLOCK
        )
