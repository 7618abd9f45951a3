"""``Linear``: a ZeRO-sharded linear layer, and ``OpLinear``, its matmul with a hand-written backward."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..module import DistributedModule
from ..parameter import DistributedParameter, ParameterInitializer

__all__ = ["Linear", "OpLinear", "check_features"]


def check_features(**features: int) -> None:
    for name, value in features.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


class OpLinear(torch.autograd.Function):
    """``F.linear(x, weight, bias)``; backward computes only the gradients that are needed."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        ctx.save_for_backward(x, weight, bias)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(
        ctx: Any, grad_output: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        x, weight, bias = ctx.saved_tensors
        need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
        g2 = grad_output.reshape(-1, grad_output.shape[-1])
        grad_x = grad_output.matmul(weight) if need_x else None
        grad_weight = g2.t().matmul(x.reshape(-1, x.shape[-1])) if need_weight else None
        grad_bias = g2.sum(0) if bias is not None and need_bias else None
        return grad_x, grad_weight, grad_bias


class Linear(DistributedModule):
    """``y = x W^T + b`` with ``W: (out_features, in_features)`` (xavier normal) and ``b`` zeros.

    Both are ZeRO-sharded over the zero group; nothing larger than a shard is allocated here.
    """

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        check_features(in_features=in_features, out_features=out_features)
        self.in_features = in_features
        self.out_features = out_features
        self.out = out_features  # the reference's alias
        self.weight = DistributedParameter(
            torch.empty((out_features, in_features), dtype=dtype, device="meta"),
            init_method=ParameterInitializer(torch.nn.init.xavier_normal_),
        )
        if bias:
            self.bias = DistributedParameter(
                torch.empty((out_features,), dtype=dtype, device="meta"),
                init_method=ParameterInitializer(torch.nn.init.zeros_),
            )
        else:
            self.register_parameter("bias", None)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = OpLinear.apply(input, self.weight, self.bias)  # type: ignore[no-untyped-call]
        return out

    def extra_repr(self) -> str:
        # reads _parameters: attribute access would all-gather the weights
        has_bias = self._parameters.get("bias") is not None
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={has_bias}"
