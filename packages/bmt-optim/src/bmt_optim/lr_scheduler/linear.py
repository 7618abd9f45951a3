"""``Linear``: warm-up, then a straight line from ``start_lr`` at ``warmup_iter`` to 0 at ``end_iter``."""

from __future__ import annotations

from .warmup import WarmupLRScheduler

__all__ = ["Linear", "decay_progress"]


def decay_progress(num_iter: int, warmup_iter: int, end_iter: int) -> float:
    """Fraction of the decay done: 0 at ``warmup_iter``, 1 at ``end_iter`` and after.

    The span is ``max(1, end_iter - warmup_iter)``, so ``end_iter <= warmup_iter`` decays in one
    step instead of dividing by zero (or by a negative span).
    """
    span = max(1, end_iter - warmup_iter)
    return min(1.0, max(0.0, (num_iter - warmup_iter) / span))


class Linear(WarmupLRScheduler):
    def get_lr_decay(self, num_iter: int) -> float:
        return self.start_lr * (1.0 - decay_progress(num_iter, self.warmup_iter, self.end_iter))
