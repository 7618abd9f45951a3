# mypy: disable-error-code="untyped-decorator,no-untyped-def"
"""Fused Adam in one Triton kernel (imported only when Triton is present).

One pass per flat tensor: read the gradient (any float dtype), unscale it, update the fp32
moments and the fp32 master, and write the fp16/bf16 parameter. For a bf16 parameter with an
fp32 master that is 28 bytes moved per element (grad 2, master 4+4, moments 8+8, param 2).
Uses only what Triton 3.6 (GPU hosts) and 3.9 (CPU interpreter in tests) both support.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .kernels_adam import AdamScalars

__all__ = ["adam_update_triton"]

_BLOCK = 1024  # elements per program: 8 per thread at 4 warps, 16-byte loads for fp32/bf16
_NUM_WARPS = 4


@triton.jit
def _adam_kernel(
    param_ptr,
    grad_ptr,
    master_ptr,
    exp_avg_ptr,
    exp_avg_sq_ptr,
    n,
    decay,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    eps,
    step_size,
    bc2_sqrt,
    grad_mul,
    HAS_MASTER: tl.constexpr,
    OUT_BF16: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32) * grad_mul
    if HAS_MASTER:
        p = tl.load(master_ptr + offs, mask=mask, other=0.0)
    else:
        p = tl.load(param_ptr + offs, mask=mask, other=0.0)
    m = tl.load(exp_avg_ptr + offs, mask=mask, other=0.0)
    v = tl.load(exp_avg_sq_ptr + offs, mask=mask, other=0.0)
    p = p * decay
    m = m + one_minus_beta1 * (g - m)
    v = v * beta2 + (one_minus_beta2 * g) * g
    # IEEE sqrt/div (not the approximate defaults): results match torch's to rounding
    denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    p = p - tl.div_rn(step_size * m, denom)
    tl.store(exp_avg_ptr + offs, m, mask=mask)
    tl.store(exp_avg_sq_ptr + offs, v, mask=mask)
    if HAS_MASTER:
        tl.store(master_ptr + offs, p, mask=mask)
        if OUT_BF16:
            # explicit round-to-nearest-even (the interpreter's cast truncates); NaN stays NaN
            bits = p.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            bits = tl.where(p != p, 0x7FC0, bits)
            tl.store(param_ptr + offs, bits.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
        else:
            tl.store(param_ptr + offs, p.to(param_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(param_ptr + offs, p, mask=mask)


def adam_update_triton(
    param: torch.Tensor,
    grad: torch.Tensor,
    master: torch.Tensor | None,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    s: AdamScalars,
    *,
    block: int = _BLOCK,
    num_warps: int = _NUM_WARPS,
) -> None:
    """One fused launch over the contiguous ``param`` (see ``kernels_adam`` for the maths).

    ``block``/``num_warps`` are for tuning (benchmarks/optim/bench_adam.py sweeps them).
    """
    n = param.numel()
    if n == 0:
        return
    grid = (triton.cdiv(n, block),)
    with torch.cuda.device(param.device) if param.is_cuda else contextlib.nullcontext():
        _adam_kernel[grid](
            param,
            grad,
            param if master is None else master,
            exp_avg,
            exp_avg_sq,
            n,
            s.decay,
            s.one_minus_beta1,
            s.beta2,
            s.one_minus_beta2,
            s.eps,
            s.step_size,
            s.bc2_sqrt,
            s.grad_mul,
            HAS_MASTER=master is not None,
            OUT_BF16=param.dtype == torch.bfloat16,
            BLOCK=block,
            num_warps=num_warps,
        )

