"""``Noam`` ("Attention is all you need"): ``s/sqrt(w) * n/w`` in warm-up, then ``s/sqrt(n)``."""

from __future__ import annotations

import math

from .warmup import WarmupLRScheduler

__all__ = ["Noam"]


class Noam(WarmupLRScheduler):
    def get_lr_warmup(self, num_iter: int) -> float:
        return self.start_lr / math.sqrt(self.warmup_iter) * num_iter / self.warmup_iter

    def get_lr_decay(self, num_iter: int) -> float:
        # n = 0 happens only with warmup_iter = 0; the reference divides by zero there. Using
        # max(n, 1) gives start_lr at n = 0 and 1, which is also where the curve goes at n = 1.
        return self.start_lr / math.sqrt(max(num_iter, 1))
