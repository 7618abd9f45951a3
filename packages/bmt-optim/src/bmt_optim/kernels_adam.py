"""The Adam update (decoupled weight decay) of one flat tensor: Triton on GPU, torch elsewhere.

Every implementation (this module's torch path, the Triton kernel in ``_adam_triton`` and the
C++ CPU kernel in ``csrc/cpu_adam.cpp``) computes, in fp32 and in this order (the order of
``torch.optim.AdamW``'s single-tensor path)::

    g = grad * grad_mul                      # grad_mul = (-1 if maximize else 1) / loss_scale
    p = p * decay                            # decay = 1 - lr * weight_decay
    m = m + (1 - beta1) * (g - m)            # torch's lerp (an fma on CPU)
    v = v * beta2 + ((1 - beta2) * g) * g    # torch's addcmul (an fma on CPU)
    p = p - (step_size * m) / (sqrt(v) / bc2_sqrt + eps)   # torch's addcdiv
    out = p.to(out.dtype)                    # when the parameter is fp16/bf16

The moments are kept unscaled in fp32 for every parameter dtype, so a change of loss scale
needs no rescaling of the state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._triton_support import Backend, triton_available, triton_interpreting
from ._triton_support import backend_for as _tensor_backend

__all__ = [
    "SUPPORTED_DTYPES",
    "AdamScalars",
    "Backend",
    "adam_update",
    "adam_update_torch",
    "backend_for",
    "triton_available",
    "triton_interpreting",
]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_TORCH_CHUNK = 1 << 20  # the torch path works in pieces this long: bounded temporaries, cache-warm


@dataclass(frozen=True)
class AdamScalars:
    """The per-step constants of one parameter's update (computed in float64, used as fp32)."""

    decay: float
    one_minus_beta1: float
    beta2: float
    one_minus_beta2: float
    eps: float
    step_size: float
    bc2_sqrt: float
    grad_mul: float
    inv_bc1: float  # 1 / (1 - beta1^t); with weight_decay, for the update statistics (record_delta)
    weight_decay: float

    @classmethod
    def make(
        cls,
        *,
        lr: float,
        beta1: float,
        beta2: float,
        eps: float,
        weight_decay: float,
        step: int,
        scale: float = 1.0,
        maximize: bool = False,
    ) -> AdamScalars:
        """Constants for update number ``step`` (1-based) with gradients multiplied by ``scale``."""
        if step < 1:
            raise ValueError(f"step must be >= 1 (1 for the first update), got {step}")
        if not scale > 0 or math.isinf(scale):
            raise ValueError(f"loss scale must be a positive finite number, got {scale}")
        lr, beta1, beta2 = float(lr), float(beta1), float(beta2)
        return cls(
            decay=1.0 - lr * float(weight_decay),
            one_minus_beta1=1.0 - beta1,
            beta2=beta2,
            one_minus_beta2=1.0 - beta2,
            eps=float(eps),
            step_size=lr / (1.0 - beta1**step),
            bc2_sqrt=math.sqrt(1.0 - beta2**step),
            grad_mul=(-1.0 if maximize else 1.0) / float(scale),
            inv_bc1=1.0 / (1.0 - beta1**step),
            weight_decay=float(weight_decay),
        )


def backend_for(t: torch.Tensor) -> Backend:
    """Triton for contiguous CUDA tensors (and CPU ones under the interpreter); else torch."""
    return _tensor_backend(t) if t.is_contiguous() else Backend.TORCH


def adam_update_torch(
    master: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    grad: torch.Tensor,
    out: torch.Tensor | None,
    s: AdamScalars,
    delta: torch.Tensor | None = None,
) -> None:
    """The update with torch ops, in place. ``master``/moments fp32, same shape as ``grad``.

    ``out`` (fp16/bf16/fp32, may be None) receives the new ``master`` cast to its dtype.
    ``delta`` (float64, 2 elements, may be None): the sum and the sum of squares of the update
    direction ``m_hat / (sqrt(v_hat) + eps) + weight_decay * master`` are added to it.
    """
    n = master.numel()
    parts = [master, exp_avg, exp_avg_sq, grad] + ([] if out is None else [out])
    if n <= _TORCH_CHUNK or not all(t.is_contiguous() for t in parts):
        _torch_piece(master, exp_avg, exp_avg_sq, grad, out, s, delta)
        return
    mv, ea, eas, g = (t.view(-1) for t in (master, exp_avg, exp_avg_sq, grad))
    ov = None if out is None else out.view(-1)
    for a in range(0, n, _TORCH_CHUNK):
        b = min(n, a + _TORCH_CHUNK)
        _torch_piece(mv[a:b], ea[a:b], eas[a:b], g[a:b], None if ov is None else ov[a:b], s, delta)


def _torch_piece(
    master: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    grad: torch.Tensor,
    out: torch.Tensor | None,
    s: AdamScalars,
    delta: torch.Tensor | None = None,
) -> None:
    g = grad.to(torch.float32) * s.grad_mul  # a new tensor: the caller's grad is never modified
    exp_avg.lerp_(g, s.one_minus_beta1)
    exp_avg_sq.mul_(s.beta2).addcmul_(g, g, value=s.one_minus_beta2)
    denom = exp_avg_sq.sqrt().div_(s.bc2_sqrt).add_(s.eps)
    if delta is not None:  # before the master changes: the direction uses the old value
        d = (exp_avg * s.inv_bc1).div_(denom).add_(master, alpha=s.weight_decay).double()
        delta += torch.stack([d.sum(), d.square().sum()])
    master.mul_(s.decay)
    master.addcdiv_(exp_avg, denom, value=-s.step_size)
    if out is not None:
        out.copy_(master)


def adam_update(
    param: torch.Tensor,
    grad: torch.Tensor,
    master: torch.Tensor | None,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    s: AdamScalars,
) -> Backend:
    """Update ``param`` in place (through its fp32 ``master`` when given); returns the path taken.

    Without ``master`` the parameter must be fp32 and is itself the master copy.
    """
    if master is None and param.dtype != torch.float32:
        raise ValueError(f"a {param.dtype} parameter needs an fp32 master copy")
    backend = backend_for(param)
    if backend is Backend.TRITON and all(t.is_contiguous() for t in (grad, exp_avg, exp_avg_sq)) and (
        master is None or master.is_contiguous()
    ):
        from ._adam_triton import adam_update_triton

        adam_update_triton(param, grad, master, exp_avg, exp_avg_sq, s)
        return Backend.TRITON
    if master is None:
        adam_update_torch(param, exp_avg, exp_avg_sq, grad, None, s)
    else:
        adam_update_torch(master, exp_avg, exp_avg_sq, grad, param, s)
    return Backend.TORCH
