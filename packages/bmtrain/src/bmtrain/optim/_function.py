"""BMTrain 1.0.1's ``bmtrain.optim._function``: the fp32 -> fp16/bf16 conversions.

1.0.1's ``adam_cpu``, ``adam_fp16`` and ``adam_bf16`` (raw-pointer launchers of its own kernels,
with a half-precision first moment in ``adam_fp16``) are not provided: the optimizers here run
their own fused update (``bmt_optim.kernels_adam.adam_update``).
"""

from __future__ import annotations

import torch

__all__ = ["bf16_from_fp32", "fp16_from_fp32"]


def _check_fp32(t: torch.Tensor) -> None:
    if t.dtype != torch.float32:
        raise TypeError(f"param_fp32 must be a float32 tensor, got {t.dtype}")


def bf16_from_fp32(param_fp32: torch.Tensor) -> torch.Tensor:
    """A new bfloat16 tensor of ``param_fp32``'s values, truncated (the high 16 bits), as 1.0.1's
    kernel does; ``param_fp32.to(torch.bfloat16)`` rounds to nearest instead."""
    _check_fp32(param_fp32)
    high = (param_fp32.contiguous().view(torch.int32) >> 16) & 0xFFFF  # 0 .. 65535
    return torch.where(high >= 1 << 15, high - (1 << 16), high).to(torch.int16).view(torch.bfloat16)


def fp16_from_fp32(param_fp32: torch.Tensor) -> torch.Tensor:
    """A new float16 tensor of ``param_fp32``'s values, rounded to nearest even."""
    _check_fp32(param_fp32)
    return param_fp32.to(torch.float16)
