"""BMTrain 1.0.1's cross-entropy autograd functions: per-row losses, unreduced, fp32.

``OpFusedCrossEntropy.apply(x, target, ignore_index)``: ``x`` ``(m, n)`` logits, ``target`` int32
``(m,)``; row ``i``'s loss, 0 where ``target[i] == ignore_index``.
``VPFusedCrossEntropy.apply(logits, target)``: ``logits`` ``(m, V/tp)``, this tp rank's slice of
the vocabulary, ``target`` ``(m,)`` global ids; row ``i``'s loss over the whole vocabulary (a
target outside ``[0, V)``, e.g. -100, gives ``log(sum exp)``, as in 1.0.1; the caller weights it
with 0). Both run on any device; ``FusedCrossEntropy`` is the module to use.
"""

from __future__ import annotations

from typing import Any

import torch
from bmt_comm import Communicator, ReduceOp, all_reduce, get_context

from . import functional as F

__all__ = ["OpFusedCrossEntropy", "VPFusedCrossEntropy"]

_SUM_EPS = 1e-10  # 1.0.1 adds this to the all-reduced sum of exponentials ("avoid nan")


class OpFusedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, target: torch.Tensor, ignore_index: int) -> torch.Tensor:
        if x.dim() != 2:
            raise ValueError(f"OpFusedCrossEntropy needs 2-D (m, n) logits, got shape {tuple(x.shape)}")
        x = x.contiguous()
        softmax = torch.empty_like(x)
        out = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
        F.cross_entropy_forward(x.shape[0], x.shape[1], x, target.int().contiguous(), softmax, out, ignore_index)
        ctx.ignore_index = ignore_index
        ctx.save_for_backward(softmax, target)
        return out

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[Any, ...]:
        softmax, target = ctx.saved_tensors
        F.cross_entropy_backward_inplace(
            softmax.shape[0], softmax.shape[1], grad_output.float().contiguous(), target.int().contiguous(),
            softmax, ctx.ignore_index,
        )
        return softmax, None, None


class VPFusedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, target: torch.Tensor, comm: Communicator | None = None) -> torch.Tensor:
        comm = comm if comm is not None else get_context().comms.tp
        if logits.dim() != 2:
            raise ValueError(f"VPFusedCrossEntropy needs 2-D (m, V/tp) logits, got shape {tuple(logits.shape)}")
        logits = logits.contiguous()
        part = logits.shape[-1]
        start = comm.rank * part
        outside = (target < start) | (target >= start + part)  # this rank holds no logit of the target
        local_t = torch.where(outside, 0, target - start).long()
        mx = all_reduce(logits.amax(dim=-1).float(), ReduceOp.MAX, comm)
        picked = logits.gather(1, local_t[:, None])[:, 0].float().masked_fill(outside, 0.0)
        picked = all_reduce(picked, ReduceOp.SUM, comm) - mx
        s = all_reduce(F.fused_sumexp(logits, mx), ReduceOp.SUM, comm) + _SUM_EPS
        softmax = logits.clone()
        F.fused_softmax_inplace(softmax, mx, s)
        ctx.save_for_backward(softmax, outside, local_t)
        return torch.log(s) - picked

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[Any, ...]:
        softmax, outside, local_t = ctx.saved_tensors
        rows = torch.arange(softmax.shape[0], device=softmax.device)
        grad = softmax.float()
        grad[rows, local_t] -= (~outside).float()
        grad *= grad_output.float()[:, None]
        return grad.to(softmax.dtype), None, None
