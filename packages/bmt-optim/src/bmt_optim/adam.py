"""``AdamOptimizer``: Adam with the state on the parameter's device and an fp32 master for fp16/bf16.

fp32 parameters go through torch's own Adam functional, as in BMTrain 1.0.1: the result is
bitwise ``torch.optim.Adam`` (or ``torch.optim.AdamW`` with ``decoupled_weight_decay=True``).
For fp16/bf16 parameters on GPU each tensor it is given is updated by ONE fused Triton kernel
that unscales the gradient, updates the moments and the fp32 master (decoupled weight decay, as
1.0.1's kernel) and writes the low-precision parameter: one launch per parameter from
``model.parameters()``, one per flat buffer from ``bmt.grouped_parameters(model)`` (see
``_adam_base`` for what each gives). Elsewhere (CPU, no Triton) the same arithmetic runs as
torch ops.

Differences from BMTrain 1.0.1's ``AdamOptimizer``, on purpose:
- one ``hold_steps`` rule for every dtype: the first ``hold_steps`` steps use lr 0 (1.0.1 held
  one step fewer for fp16/bf16 parameters);
- ``exp_avg`` is unscaled fp32 for fp16 params too, so ``_on_justify_scale`` is a no-op; a
  loaded fp16 ``exp_avg`` is cast to fp32;
- ``maximize`` is honoured per parameter group.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ._adam_base import AdamBase
from ._torch_adam import TorchAdamArgs, torch_adam_
from .kernels_adam import adam_update

__all__ = ["AdamOptimizer"]


class AdamOptimizer(AdamBase):
    """Adam on fp32 parameters (torch's; AdamW with ``decoupled_weight_decay``), AdamW on fp16/bf16.

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
        fp32: dict[tuple[int, bool], list[tuple[torch.Tensor, torch.Tensor, TorchAdamArgs]]] = {}
        for group, p, grad in self._params_to_update():
            state = self.state[p]
            if not state:
                state.update(self._new_state(p))
            state["step"] += 1
            if p.dtype == torch.float32:
                args = self._torch_args(group, state["step"], scale)
                # one torch call per group (and hold status): torch's foreach runs them together
                fp32.setdefault((id(group), args.lr == 0.0), []).append((p, grad, args))
                continue
            adam_update(
                p.data,
                grad,
                state.get("_param_fp32"),
                state["exp_avg"],
                state["exp_avg_sq"],
                self._scalars(group, state["step"], scale),
            )
        for work in fp32.values():
            torch_adam_(
                [p for p, _, _ in work],  # the parameters themselves: torch picks foreach by their type
                [_unscaled(g, a.scale) for _, g, a in work],
                [self.state[p]["exp_avg"] for p, _, _ in work],
                [self.state[p]["exp_avg_sq"] for p, _, _ in work],
                [a for _, _, a in work],
            )
        return loss

    def _place(self, p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return t.to(p.device, torch.float32, copy=True).reshape(p.shape).contiguous()

    def _zeros(self, p: torch.Tensor) -> torch.Tensor:
        return torch.zeros(p.shape, dtype=torch.float32, device=p.device)

    def _has_master(self, p: torch.Tensor) -> bool:
        return p.dtype != torch.float32


def _unscaled(grad: torch.Tensor, scale: float) -> torch.Tensor:
    """The fp32 gradient divided by the loss scale (``grad / scale``, as 1.0.1 computed it)."""
    g = grad if grad.dtype == torch.float32 else grad.float()
    return g if scale == 1.0 else g / scale
