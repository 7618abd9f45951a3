"""``FusedCrossEntropy``: cross-entropy of fp16/bf16 logits computed in fp32 without an fp32 copy.

Values and gradients are those of ``torch.nn.functional.cross_entropy`` on ``logits.float()``,
with ``weight``, ``ignore_index``, ``label_smoothing`` and every reduction. The forward keeps
per-row statistics only (max, sum-exp, log-sum-exp); the backward recomputes the softmax and
writes the gradient in the logits' dtype, into the logits themselves with ``inplace=True``.

With ``parallel=True`` the logits are this rank's shard ``(N, C / tp)`` of a vocabulary split
over the tensor-parallel group, targets are global ids, and the per-row statistics are merged
with two all-reduces; each rank gets the gradient of its own shard.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

import torch
import torch.nn.functional as F
from bmt_comm import Communicator, ReduceOp, get_context

from .._triton_support import Backend, backend_for
from . import _ce_torch
from .stats import RowStats

__all__ = ["FusedCrossEntropy", "Reduction", "fused_cross_entropy"]


class Reduction(str, Enum):
    NONE = "none"
    SUM = "sum"
    MEAN = "mean"


def _kernels(t: torch.Tensor) -> Any:
    if backend_for(t) is Backend.TRITON:
        from . import _ce_triton

        return _ce_triton
    return _ce_torch


def _check_targets(target: torch.Tensor, n_classes: int, ignore_index: int) -> None:
    """Out-of-range targets: an eager error on CPU, a device-side assert (no sync) on GPU."""
    bad = ((target < 0) | (target >= n_classes)) & (target != ignore_index)
    if target.is_cuda:
        torch._assert_async(
            torch.logical_not(bad.any()),
            f"cross-entropy target out of range [0, {n_classes}) (ignore_index={ignore_index})",
        )
        return
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"cross-entropy target {int(target[i])} at row {i} is out of range [0, {n_classes}) "
            f"and is not ignore_index ({ignore_index})"
        )


class _FusedCrossEntropyFn(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        logits: torch.Tensor,
        target: torch.Tensor,
        weight: torch.Tensor | None,
        ignore_index: int,
        reduction: Reduction,
        smoothing: float,
        inplace: bool,
        comm: Communicator | None,
    ) -> torch.Tensor:
        n, c_local = logits.shape
        tp_rank, tp_size = (comm.rank, comm.size) if comm is not None else (0, 1)
        n_classes = c_local * tp_size
        col_start = tp_rank * c_local
        _check_targets(target, n_classes, ignore_index)
        target = target.long()
        w_local = weight[col_start : col_start + c_local] if weight is not None else None

        kernels = _kernels(logits)
        stats: RowStats = kernels.row_stats(logits, w_local, smoothing > 0)
        valid = target != ignore_index
        t_local = target - col_start
        mine = valid & (t_local >= 0) & (t_local < c_local)
        t_local = torch.where(mine, t_local, torch.full_like(t_local, -1))
        x_t = logits.gather(1, t_local.clamp(min=0)[:, None])[:, 0].float()
        x_t = torch.where(mine, x_t, torch.zeros_like(x_t))  # where, not *: the stand-in may be -inf
        m, sumexp, wsum = stats
        if comm is not None:  # merge the shards' statistics: max first, then the sums
            m_all = comm.all_reduce(m.clone(), ReduceOp.MAX)
            m_use = torch.where(torch.isneginf(m_all), torch.zeros_like(m_all), m_all)
            sums = [sumexp * torch.exp(m - m_use), x_t] + ([wsum] if wsum is not None else [])
            merged = comm.all_reduce(torch.stack(sums), ReduceOp.SUM)
            m, sumexp, x_t = m_all, merged[0], merged[1]
            wsum = merged[2] if wsum is not None else None
        lse = m + torch.log(sumexp)

        zero = torch.zeros_like(lse)
        w_t = weight[target.clamp(0, n_classes - 1)] if weight is not None else torch.ones_like(lse)
        w_t = torch.where(valid, w_t, zero)
        # ignored rows give exactly 0 (not 0 * whatever their logits hold)
        loss = torch.where(valid, (lse - x_t) * w_t, zero)
        # sum of the class weights (a tensor: reading it would synchronise the device)
        w_total = weight.sum() if weight is not None else torch.tensor(float(n_classes), device=lse.device)
        if wsum is not None:  # torch: (1 - e) * nll + e / C * sum_c w_c * (lse - x_c)
            smooth = torch.where(valid, lse * w_total - wsum, zero)
            loss = (1.0 - smoothing) * loss + (smoothing / n_classes) * smooth

        ctx.save_for_backward(logits, lse, t_local, w_t, valid, w_local, w_total)
        ctx.args = (reduction, smoothing, inplace, n_classes)
        if reduction is Reduction.NONE:
            return loss
        if reduction is Reduction.SUM:
            return loss.sum()
        denom = w_t.sum()
        ctx.denom = denom
        return loss.sum() / denom

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        logits, lse, t_local, w_t, valid, w_local, w_total = ctx.saved_tensors
        reduction, smoothing, inplace, n_classes = ctx.args
        g = grad_out.float()
        if reduction is Reduction.MEAN:
            g = g / ctx.denom
        g = g.expand_as(lse)
        zero = torch.zeros_like(g)
        coef_t = torch.where(valid, g * (1.0 - smoothing) * w_t, zero)  # ignored rows: exactly 0
        coef_w = torch.where(valid, g * (smoothing / n_classes), zero) if smoothing > 0 else None
        coef_p = coef_t + coef_w * w_total if coef_w is not None else coef_t
        out = logits if inplace else torch.empty_like(logits)
        _kernels(logits).write_grad(
            logits, out, lse, t_local, coef_p.contiguous(), coef_t.contiguous(),
            coef_w.contiguous() if coef_w is not None else None, w_local,
        )
        return out, None, None, None, None, None, None, None


def fused_cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: Reduction | str = "mean",
    label_smoothing: float = 0.0,
    inplace: bool = False,
    parallel: bool = False,
) -> torch.Tensor:
    """Functional form of :class:`FusedCrossEntropy`; returns fp32."""
    red = _parse_reduction(reduction)
    _check_smoothing(label_smoothing)
    if input.dim() != 2:
        raise ValueError(f"cross-entropy input must be 2-D (N, C), got shape {tuple(input.shape)}")
    if input.shape[1] == 0:
        raise ValueError(f"cross-entropy input needs at least one class, got shape {tuple(input.shape)}")
    if not input.is_floating_point():
        raise TypeError(f"cross-entropy input must be floating point, got {input.dtype}")
    if target.dim() != 1 or target.shape[0] != input.shape[0]:
        raise ValueError(
            f"cross-entropy target must be 1-D with N = {input.shape[0]} entries, got shape {tuple(target.shape)}"
        )
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"cross-entropy target must hold class ids (an integer dtype), got {target.dtype}")
    comm = get_context().comms.tp if parallel else None
    n_classes = input.shape[1] * (comm.size if comm is not None else 1)
    if weight is not None and (weight.dim() != 1 or weight.shape[0] != n_classes):
        raise ValueError(
            f"cross-entropy weight must be 1-D with one entry per class ({n_classes}), "
            f"got shape {tuple(weight.shape)}"
        )
    if comm is None and input.dtype in (torch.float32, torch.float64):
        return F.cross_entropy(
            input, target, weight=weight, ignore_index=ignore_index, reduction=red.value,
            label_smoothing=label_smoothing,
        )
    w = weight.float().contiguous() if weight is not None else None
    out: torch.Tensor = _FusedCrossEntropyFn.apply(  # type: ignore[no-untyped-call]
        input.contiguous(), target.contiguous(), w, ignore_index, red, float(label_smoothing), inplace, comm
    )
    return out


def _parse_reduction(reduction: Reduction | str) -> Reduction:
    try:
        return Reduction(reduction)
    except ValueError:
        raise ValueError(
            f"reduction must be one of {[r.value for r in Reduction]}, got {reduction!r}"
        ) from None


def _check_smoothing(label_smoothing: float) -> None:
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing!r}")


class FusedCrossEntropy(torch.nn.Module):
    """Cross-entropy on ``(N, C)`` logits and ``(N,)`` class ids; see the module docstring.

    ``inplace=True`` writes the gradient into the logits' buffer (saves one logits-sized
    allocation); use it only when nothing else needs the logits after the loss.
    fp32/fp64 logits (not parallel) go to ``F.cross_entropy`` unchanged; ``inplace`` has no
    effect there.
    """

    weight: torch.Tensor | None

    def __init__(
        self,
        weight: torch.Tensor | None = None,
        ignore_index: int = -100,
        reduction: Reduction | str = "mean",
        label_smoothing: float = 0.0,
        parallel: bool = False,
        *,
        inplace: bool = False,  # keyword-only: 1.0.1's fifth positional argument is ``parallel``
    ) -> None:
        super().__init__()
        # follows .to()/.cuda() but stays out of state_dict, as 1.0.1's plain attribute does
        self.register_buffer("weight", weight, persistent=False)
        self.ignore_index = ignore_index
        self.reduction = _parse_reduction(reduction)
        _check_smoothing(label_smoothing)
        self.label_smoothing = float(label_smoothing)
        self.inplace = inplace
        self.parallel = parallel

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return fused_cross_entropy(
            input, target, self.weight, self.ignore_index, self.reduction, self.label_smoothing,
            self.inplace, self.parallel,
        )

    def extra_repr(self) -> str:
        return (
            f"ignore_index={self.ignore_index}, reduction={self.reduction.value}, "
            f"label_smoothing={self.label_smoothing}, inplace={self.inplace}, parallel={self.parallel}"
        )
