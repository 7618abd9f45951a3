"""``WarmupLRScheduler``: linear warm-up to ``start_lr``, then a decay chosen by the subclass.

Not a torch scheduler: it writes ``group["lr"]`` of every param group on construction and on each
``step``, as BMTrain does. Subclasses define ``get_lr_warmup(n)`` and ``get_lr_decay(n)``.
"""

from __future__ import annotations

from typing import Any, Protocol

__all__ = ["HasParamGroups", "WarmupLRScheduler"]


class HasParamGroups(Protocol):
    """Any optimizer: the scheduler only writes ``lr`` into its param groups."""

    param_groups: list[dict[str, Any]]


def _check_nonneg_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return value


class WarmupLRScheduler:
    """``lr = start_lr * n / warmup_iter`` while ``n < warmup_iter``, then ``get_lr_decay(n)``.

    ``n`` is ``num_iter``: the number of ``step()`` calls so far (plus the initial ``num_iter``).
    """

    def __init__(
        self,
        optimizer: HasParamGroups,
        start_lr: float,
        warmup_iter: int,
        end_iter: int,
        num_iter: int = 0,
    ) -> None:
        if not start_lr >= 0:
            raise ValueError(f"start_lr must be >= 0, got {start_lr!r}")
        self.optimizer = optimizer
        self.start_lr = float(start_lr)
        self.warmup_iter = _check_nonneg_int("warmup_iter", warmup_iter)
        self.end_iter = int(end_iter)
        self.num_iter = _check_nonneg_int("num_iter", num_iter)
        self._current_lr = 0.0
        self.step(self.num_iter)

    # --- the schedule -------------------------------------------------------------------
    def get_lr_warmup(self, num_iter: int) -> float:
        """Linear ramp from 0 (only called with ``num_iter < warmup_iter``, so never / 0)."""
        return self.start_lr * num_iter / self.warmup_iter

    def get_lr_decay(self, num_iter: int) -> float:
        raise NotImplementedError(f"{type(self).__name__} must define get_lr_decay(num_iter)")

    def get_lr(self) -> float:
        if self.num_iter < self.warmup_iter:
            return self.get_lr_warmup(self.num_iter)
        return self.get_lr_decay(self.num_iter)

    # --- driving it ---------------------------------------------------------------------
    @property
    def current_lr(self) -> float:
        return self._current_lr

    def step(self, num_iter: int | None = None) -> None:
        """Advance one iteration (or jump to ``num_iter``) and write the lr into the optimizer."""
        if num_iter is None:
            num_iter = self.num_iter + 1
        self.num_iter = _check_nonneg_int("num_iter", num_iter)
        lr = self.get_lr()
        self._current_lr = lr
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def state_dict(self) -> dict[str, Any]:
        return {
            "start_lr": self.start_lr,
            "warmup_iter": self.warmup_iter,
            "end_iter": self.end_iter,
            "num_iter": self.num_iter,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        missing = {"start_lr", "warmup_iter", "end_iter", "num_iter"} - set(state_dict)
        if missing:
            raise KeyError(f"{type(self).__name__} state dict lacks {sorted(missing)}")
        self.start_lr = float(state_dict["start_lr"])
        self.warmup_iter = _check_nonneg_int("warmup_iter", state_dict["warmup_iter"])
        self.end_iter = int(state_dict["end_iter"])
        self.step(state_dict["num_iter"])

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(start_lr={self.start_lr}, warmup_iter={self.warmup_iter}, "
            f"end_iter={self.end_iter}, num_iter={self.num_iter}, lr={self._current_lr})"
        )
