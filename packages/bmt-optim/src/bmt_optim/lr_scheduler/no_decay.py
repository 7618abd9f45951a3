"""``NoDecay``: warm-up, then a constant ``start_lr``."""

from __future__ import annotations

from .warmup import WarmupLRScheduler

__all__ = ["NoDecay"]


class NoDecay(WarmupLRScheduler):
    def get_lr_decay(self, num_iter: int) -> float:
        return self.start_lr
