"""BMTrain 1.0.1's fused-kernel functions (``bmtrain.loss._function``) in torch, on any device.

Same names, arguments and results as 1.0.1's CUDA launchers: outputs are written into the
tensors passed in, in fp32 arithmetic, cast to the tensor's dtype. 1.0.1 takes fp16/bf16 CUDA
tensors only; these also take CPU tensors and fp32/fp64 logits. Rows are processed in blocks so
the fp32 temporaries stay a few MiB whatever the vocabulary size.
"""

from __future__ import annotations

import torch

from ..nan_check import check_inf_nan_, new_flag

__all__ = [
    "cross_entropy_backward_inplace",
    "cross_entropy_forward",
    "fused_softmax_inplace",
    "fused_sumexp",
    "has_inf_nan",
]

_ELEMS = 1 << 20  # fp32 elements per block of rows (4 MiB)
_MAX_FLOOR = -1e6  # 1.0.1's forward floors the row max here (an all -inf row gives loss 0, not nan)
_SUM_EPS = 1e-10  # 1.0.1's forward adds this to the sum of exponentials ("avoid nan")


def _row_blocks(m: int, n: int) -> list[slice]:
    rows = max(1, _ELEMS // max(n, 1))
    return [slice(r, min(r + rows, m)) for r in range(0, m, rows)]


def _check_float(name: str, t: torch.Tensor) -> None:
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")


def _check_dtype(name: str, t: torch.Tensor, dtype: torch.dtype) -> None:
    if t.dtype != dtype:
        raise TypeError(f"{name} must be a {dtype} tensor, got {t.dtype}")


def _matrix(name: str, t: torch.Tensor, m: int, n: int) -> torch.Tensor:
    if t.numel() != m * n:
        raise ValueError(f"{name} must have m * n = {m} * {n} = {m * n} elements, got {t.numel()}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (the kernels write it in place), got strides {t.stride()}")
    return t.view(m, n)


def _vector(name: str, t: torch.Tensor, m: int) -> torch.Tensor:
    if t.numel() != m:
        raise ValueError(f"{name} must have m = {m} elements, got {t.numel()}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got strides {t.stride()}")
    return t.view(m)


def has_inf_nan(g_half: torch.Tensor, out: torch.Tensor) -> None:
    """Write 1 into ``out`` (a uint8 tensor, its first element) if ``g_half`` holds an inf or a nan.

    ``out`` is left as it was otherwise, so one flag can collect many tensors. No device sync.
    """
    _check_dtype("out", out, torch.uint8)
    _check_float("g_half", g_half)
    if out.numel() == 0 or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous tensor of at least 1 element, got shape {tuple(out.shape)}")
    if out.device != g_half.device:
        raise ValueError(f"out is on {out.device} but g_half is on {g_half.device}")
    flag = new_flag(g_half.device)
    check_inf_nan_(g_half, flag)
    out.view(-1)[:1].bitwise_or_(flag.to(torch.uint8))


def cross_entropy_forward(
    m: int,
    n: int,
    input: torch.Tensor,
    target: torch.Tensor,
    softmax: torch.Tensor,
    output: torch.Tensor,
    ignore_index: int,
) -> None:
    """Per row of ``input`` ``(m, n)``: ``softmax`` <- its softmax, ``output[i]`` <- its loss.

    ``output[i] = log(sum_j exp(x_ij - mx_i) + 1e-10) + mx_i - x_i,t_i`` with
    ``mx_i = max(max_j x_ij, -1e6)``; 0 where ``target[i] == ignore_index``. ``target`` int32,
    ``output`` fp32, ``softmax`` of any float dtype.
    """
    _check_float("input", input)
    _check_float("softmax", softmax)
    _check_dtype("target", target, torch.int32)
    _check_dtype("output", output, torch.float32)
    x, sm = _matrix("input", input, m, n), _matrix("softmax", softmax, m, n)
    t, out = _vector("target", target, m), _vector("output", output, m)
    for rows in _row_blocks(m, n):
        xf = x[rows].float()
        mx = xf.amax(dim=1).clamp_min(_MAX_FLOOR) if n else torch.full_like(xf[:, 0], _MAX_FLOOR)
        e = torch.exp(xf - mx[:, None])
        s = e.sum(dim=1) + _SUM_EPS
        sm[rows] = (e / s[:, None]).to(sm.dtype)
        tr = t[rows].long()
        keep = tr != ignore_index
        picked = xf.gather(1, torch.where(keep, tr, 0)[:, None])[:, 0]
        out[rows] = torch.where(keep, torch.log(s) + mx - picked, torch.zeros_like(s))


def cross_entropy_backward_inplace(
    m: int,
    n: int,
    grad_output: torch.Tensor,
    target: torch.Tensor,
    x: torch.Tensor,
    ignore_index: int,
) -> None:
    """``x`` (the forward's softmax, ``(m, n)``) <- ``(x - onehot(target)) * grad_output[:, None]``.

    A target outside ``[0, n)`` (``ignore_index`` included) subtracts nothing; 1.0.1's kernel
    takes ``ignore_index`` and does not read it either.
    """
    del ignore_index  # as in 1.0.1: the caller zeroes grad_output of ignored rows
    _check_float("x", x)
    _check_dtype("grad_output", grad_output, torch.float32)
    _check_dtype("target", target, torch.int32)
    sm = _matrix("x", x, m, n)
    g, t = _vector("grad_output", grad_output, m), _vector("target", target, m)
    cols = torch.arange(n, device=sm.device)
    for rows in _row_blocks(m, n):
        y = sm[rows].float()
        y -= (cols[None, :] == t[rows].long()[:, None]).to(y.dtype)
        y *= g[rows, None]
        sm[rows] = y.to(sm.dtype)


def fused_sumexp(logits: torch.Tensor, max_logits: torch.Tensor) -> torch.Tensor:
    """``sum_j exp(logits_ij - max_logits_i)`` per row of the 2-D ``logits``, as fp32 ``(m,)``."""
    _check_float("logits", logits)
    _check_dtype("max_logits", max_logits, torch.float32)
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D (m, n), got shape {tuple(logits.shape)}")
    m, n = logits.shape
    mx = _vector("max_logits", max_logits, m)
    out = torch.empty(m, dtype=torch.float32, device=logits.device)
    for rows in _row_blocks(m, n):
        out[rows] = torch.exp(logits[rows].float() - mx[rows, None]).sum(dim=1)
    return out


def fused_softmax_inplace(logits: torch.Tensor, max_logits: torch.Tensor, sum_exp_logits: torch.Tensor) -> None:
    """``logits`` <- ``exp(logits - max_logits[:, None]) / sum_exp_logits[:, None]`` in place."""
    _check_float("logits", logits)
    _check_dtype("max_logits", max_logits, torch.float32)
    _check_dtype("sum_exp_logits", sum_exp_logits, torch.float32)
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D (m, n), got shape {tuple(logits.shape)}")
    m, n = logits.shape
    x = _matrix("logits", logits, m, n)
    mx, s = _vector("max_logits", max_logits, m), _vector("sum_exp_logits", sum_exp_logits, m)
    for rows in _row_blocks(m, n):
        x[rows] = (torch.exp(x[rows].float() - mx[rows, None]) / s[rows, None]).to(x.dtype)
