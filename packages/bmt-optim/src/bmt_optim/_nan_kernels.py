# mypy: disable-error-code="untyped-decorator,no-untyped-def"
"""Triton kernels of the inf/nan check (imported only when Triton is present)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_support import on_device

__all__ = ["MULTI_CHUNK", "flag_non_finite", "flag_non_finite_chunks"]

_BLOCK = 4096
_ITERS = 16  # blocks per program of the multi-tensor kernel
MULTI_CHUNK = _BLOCK * _ITERS  # elements one program of the multi-tensor kernel reads


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


@triton.jit
def _non_finite_chunks_kernel(
    base_ptr, starts_ptr, lens_ptr, flag_ptr, IS_FP64: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr
):
    # one program per chunk of one tensor: its first element sits ``start`` elements from base
    c = tl.program_id(0)
    start = tl.load(starts_ptr + c)  # int64, may be negative (a tensor below the base one)
    n = tl.load(lens_ptr + c)
    bad = tl.zeros([BLOCK], dtype=tl.int32)
    for i in range(ITERS):
        offs = i * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(base_ptr + start + offs, mask=offs < n, other=0.0)
        if not IS_FP64:
            x = x.to(tl.float32)
        bad = bad | ((x != x) | (tl.abs(x) == float("inf"))).to(tl.int32)
    tl.store(flag_ptr, 1, mask=tl.max(bad, 0) > 0)


def flag_non_finite_chunks(
    base: torch.Tensor, starts: torch.Tensor, lens: torch.Tensor, flag: torch.Tensor
) -> None:
    """Set ``flag[0] = 1`` if any chunk holds an inf or a nan (one launch, no sync).

    Chunk ``c`` is the ``lens[c] <= MULTI_CHUNK`` elements that start ``starts[c]`` elements
    after ``base``'s first one (int64 tables on ``base``'s device; every chunk of ``base``'s dtype).
    """
    n_chunks = starts.numel()
    if n_chunks == 0:
        return
    with on_device(base):
        _non_finite_chunks_kernel[(n_chunks,)](
            base, starts, lens, flag, IS_FP64=base.dtype == torch.float64, BLOCK=_BLOCK, ITERS=_ITERS
        )
