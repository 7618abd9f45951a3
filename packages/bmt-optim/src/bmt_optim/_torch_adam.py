"""fp32 parameters' update: torch's own Adam/AdamW functional, so the numbers are torch's.

BMTrain 1.0.1 sent fp32 parameters through ``torch.optim._functional.adam`` (coupled L2 weight
decay); users compare such runs with ``torch.optim.Adam`` and expect the same bits. Calling
torch's functional with the same arguments that ``torch.optim.Adam.step`` passes (``foreach``
left to torch's per-device default) keeps that true on every device and torch version.
``decoupled=True`` calls torch's AdamW functional instead.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.optim.adam as _adam_mod

__all__ = ["TorchAdamArgs", "torch_adam_"]

# torch 2.6+ names decoupled decay on Adam itself; earlier versions only have the AdamW functional
_ADAM_HAS_DECOUPLED = "decoupled_weight_decay" in inspect.signature(_adam_mod.adam).parameters


@dataclass(frozen=True)
class TorchAdamArgs:
    """The hyper-parameters of one fp32 update, as torch's Adam functional takes them."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    maximize: bool
    decoupled: bool  # AdamW (decoupled decay) instead of Adam's L2 term added to the gradient
    step: int  # 1-based number of this update (torch increments the step it is handed)
    scale: float  # the loss scale the gradients carry

    def bias_corrections(self) -> tuple[float, float]:
        """1 / (1 - beta1^t) and sqrt(1 - beta2^t), as torch computes them."""
        return 1.0 / (1.0 - self.beta1**self.step), (1.0 - self.beta2**self.step) ** 0.5


def torch_adam_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    args: Sequence[TorchAdamArgs],
) -> None:
    """Update fp32 ``params`` and their moments in place with torch's Adam (or AdamW) functional.

    ``grads`` are already unscaled fp32 tensors. All ``args`` must agree except in ``step``.
    """
    if not params:
        return
    a = args[0]
    # torch.optim.Adam keeps `step` as a float32 CPU scalar and increments it before use
    steps = [torch.tensor(float(x.step - 1), dtype=torch.float32) for x in args]
    kw: dict[str, Any] = dict(
        amsgrad=False, beta1=a.beta1, beta2=a.beta2, lr=a.lr, weight_decay=a.weight_decay, eps=a.eps,
        maximize=a.maximize,
    )
    ps, gs, ms, vs = list(params), list(grads), list(exp_avgs), list(exp_avg_sqs)
    if not a.decoupled:
        _adam_mod.adam(ps, gs, ms, vs, [], steps, **kw)
    elif _ADAM_HAS_DECOUPLED:
        _adam_mod.adam(ps, gs, ms, vs, [], steps, decoupled_weight_decay=True, **kw)
    else:  # pragma: no cover - torch < 2.6
        import torch.optim.adamw as _adamw_mod

        _adamw_mod.adamw(ps, gs, ms, vs, [], steps, **kw)
