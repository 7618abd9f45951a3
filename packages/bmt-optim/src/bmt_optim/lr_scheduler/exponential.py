"""``Exponential``: warm-up, then ``start_lr * gamma ** (n - warmup_iter)``."""

from __future__ import annotations

from typing import Any

from .warmup import HasParamGroups, WarmupLRScheduler

__all__ = ["Exponential"]


class Exponential(WarmupLRScheduler):
    """``end_iter`` is kept for the common signature and the state dict; the decay ignores it."""

    def __init__(
        self,
        optimizer: HasParamGroups,
        start_lr: float,
        warmup_iter: int,
        end_iter: int,
        num_iter: int = 0,
        gamma: float = 0.95,
    ) -> None:
        if not gamma > 0:
            raise ValueError(f"gamma must be > 0, got {gamma!r}")
        self.gamma = float(gamma)  # set before the base class's first step() reads it
        super().__init__(optimizer, start_lr, warmup_iter, end_iter, num_iter)

    def get_lr_decay(self, num_iter: int) -> float:
        return max(0.0, self.start_lr * self.gamma ** (num_iter - self.warmup_iter))

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "gamma": self.gamma}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # BMTrain's state dicts have no gamma: keep this scheduler's then
        if "gamma" in state_dict:
            if not state_dict["gamma"] > 0:
                raise ValueError(f"gamma must be > 0, got {state_dict['gamma']!r}")
            self.gamma = float(state_dict["gamma"])
        super().load_state_dict(state_dict)
