"""Inf/nan check on any tensor: a Triton kernel on GPU, torch on CPU.

``check_inf_nan_`` accumulates into a flag tensor without synchronising the device, so an
optimizer can check every gradient and read one flag (after an all-reduce) at the end.
"""

from __future__ import annotations

import torch

from ._triton_support import Backend, backend_for

__all__ = ["check_inf_nan_", "has_inf_nan", "new_flag"]

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_CHUNK = 1 << 24  # torch fallback: bounds the temporary bool mask to 16 Mi elements


def new_flag(device: torch.device | str) -> torch.Tensor:
    """A fresh flag: int32 ``(1,)``, 0 = all finite so far."""
    return torch.zeros(1, dtype=torch.int32, device=device)


def _check_flag(tensor: torch.Tensor, flag: torch.Tensor) -> None:
    if flag.dtype != torch.int32 or flag.numel() != 1:
        raise TypeError(
            f"the inf/nan flag must be a 1-element int32 tensor (see new_flag), "
            f"got dtype {flag.dtype} with {flag.numel()} elements"
        )
    if flag.device != tensor.device:
        raise ValueError(f"the inf/nan flag is on {flag.device} but the tensor is on {tensor.device}")


def check_inf_nan_(tensor: torch.Tensor, flag: torch.Tensor) -> torch.Tensor:
    """Set ``flag`` to 1 if ``tensor`` holds an inf or a nan; leave it as it was otherwise.

    Does not synchronise the device. Integer and bool tensors are always finite. Returns ``flag``.
    """
    _check_flag(tensor, flag)
    if tensor.numel() == 0 or not (tensor.is_floating_point() or tensor.is_complex()):
        return flag
    if tensor.is_complex():
        tensor = torch.view_as_real(tensor)
    flat = tensor.reshape(-1)
    if flat.dtype in _TRITON_DTYPES and backend_for(flat) is Backend.TRITON:
        from ._nan_kernels import flag_non_finite

        flag_non_finite(flat.contiguous(), flag)
        return flag
    for chunk in torch.split(flat, _CHUNK):
        if chunk.dtype not in _TRITON_DTYPES:
            chunk = chunk.to(torch.float32)  # fp8 and friends: isfinite needs a wider type
        bad = torch.logical_not(torch.isfinite(chunk)).any()
        flag.bitwise_or_(bad.to(torch.int32))
    return flag


def has_inf_nan(tensor: torch.Tensor) -> bool:
    """True if ``tensor`` holds an inf or a nan (synchronises the device to read the answer)."""
    flag = new_flag(tensor.device)
    check_inf_nan_(tensor, flag)
    return bool(flag.item())
