"""``Cosine``: warm-up, then half a cosine from ``start_lr`` at ``warmup_iter`` to 0 at ``end_iter``.

Past ``end_iter`` the lr stays 0 (the iteration is clamped to ``end_iter``): the reference's
formula lets the cosine climb back up.
"""

from __future__ import annotations

import math

from .linear import decay_progress
from .warmup import WarmupLRScheduler

__all__ = ["Cosine"]


class Cosine(WarmupLRScheduler):
    def get_lr_decay(self, num_iter: int) -> float:
        progress = decay_progress(num_iter, self.warmup_iter, self.end_iter)
        return max(0.0, self.start_lr * 0.5 * (1.0 + math.cos(math.pi * progress)))
