"""Layers shared by the example models, written as BMTrain users write them.

Each layer is a ``bmt.DistributedModule`` holding ``bmt.DistributedParameter``s. A parameter is
built from a tensor on the ``meta`` device: nothing bigger than this rank's shard is ever
allocated, and ``bmt.init_parameters`` fills it from its ``init_method``. Inside ``forward``,
``self.weight`` reads as the full tensor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import bmtrain as bmt

__all__ = ["Linear", "Embedding", "LayerNorm", "RMSNorm"]


def _param(shape: tuple[int, ...], dtype: torch.dtype, init: bmt.ParameterInitializer) -> bmt.DistributedParameter:
    return bmt.DistributedParameter(torch.empty(shape, dtype=dtype, device="meta"), init_method=init)


class Linear(bmt.DistributedModule):
    """``y = x W^T (+ b)`` with ``W`` of shape ``(out, in)``, normal(0, ``std``) initialised."""

    def __init__(self, dim_in: int, dim_out: int, bias: bool, dtype: torch.dtype, std: float = 0.02) -> None:
        super().__init__()
        self.weight = _param((dim_out, dim_in), dtype, bmt.ParameterInitializer(torch.nn.init.normal_, 0.0, std))
        self.bias = _param((dim_out,), dtype, bmt.ParameterInitializer(torch.nn.init.zeros_)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        return F.linear(x, self.weight, self.bias)


class Embedding(bmt.DistributedModule):
    """Token embedding."""

    def __init__(self, vocab_size: int, dim: int, dtype: torch.dtype, std: float = 0.02) -> None:
        super().__init__()
        self.weight = _param((vocab_size, dim), dtype, bmt.ParameterInitializer(torch.nn.init.normal_, 0.0, std))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, C)
        return F.embedding(ids, self.weight)


class LayerNorm(bmt.DistributedModule):
    def __init__(self, dim: int, dtype: torch.dtype, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = _param((dim,), dtype, bmt.ParameterInitializer(torch.nn.init.ones_))
        self.bias = _param((dim,), dtype, bmt.ParameterInitializer(torch.nn.init.zeros_))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., C) -> (..., C)
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)


class RMSNorm(bmt.DistributedModule):
    """``x / rms(x) * weight``, the statistics in fp32."""

    def __init__(self, dim: int, dtype: torch.dtype, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = _param((dim,), dtype, bmt.ParameterInitializer(torch.nn.init.ones_))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., C) -> (..., C)
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight
