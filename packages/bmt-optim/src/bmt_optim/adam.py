"""``AdamOptimizer``: AdamW with the state on the parameter's device and an fp32 master for fp16/bf16.

On GPU each parameter tensor (ZeRO hands over a few big flat shards) is updated by ONE fused
Triton kernel that unscales the gradient, updates the moments and the fp32 master and writes the
low-precision parameter. Elsewhere (CPU, no Triton) the same arithmetic runs as torch ops.

Differences from BMTrain 1.0.1's ``AdamOptimizer``, on purpose:
- decoupled weight decay (AdamW) for every dtype (the original used L2 decay for fp32 params);
- one ``hold_steps`` rule for every dtype: the first ``hold_steps`` steps use lr 0;
- ``exp_avg`` is unscaled fp32 for fp16 params too, so ``_on_justify_scale`` is a no-op; a
  loaded fp16 ``exp_avg`` is cast to fp32;
- ``maximize`` is honoured per parameter group.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ._adam_base import AdamBase
from .kernels_adam import adam_update

__all__ = ["AdamOptimizer"]


class AdamOptimizer(AdamBase):
    """AdamW on fp32, fp16 and bf16 parameters.

    State per parameter (on its device): ``step`` (int), ``exp_avg`` and ``exp_avg_sq`` (fp32,
    the parameter's shape) and, for fp16/bf16 parameters, ``_param_fp32`` (the fp32 master).
    """

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, scale: float = 1) -> Any:  # type: ignore[override]
        """One update of every parameter with a gradient; gradients are divided by ``scale``."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        scale = self._check_scale(scale)
        for group, p, grad in self._params_to_update():
            state = self.state[p]
            if not state:
                state.update(self._new_state(p))
            state["step"] += 1
            adam_update(
                p.data,
                grad,
                state.get("_param_fp32"),
                state["exp_avg"],
                state["exp_avg_sq"],
                self._scalars(group, state["step"], scale),
            )
        return loss

    def _place(self, p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return t.to(p.device, torch.float32, copy=True).reshape(p.shape).contiguous()

    def _zeros(self, p: torch.Tensor) -> torch.Tensor:
        return torch.zeros(p.shape, dtype=torch.float32, device=p.device)

    def _has_master(self, p: torch.Tensor) -> bool:
        return p.dtype != torch.float32
