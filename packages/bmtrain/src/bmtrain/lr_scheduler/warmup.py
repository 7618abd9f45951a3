"""BMTrain 1.0.1's ``bmtrain.lr_scheduler.warmup``."""

from bmt_optim.lr_scheduler.warmup import WarmupLRScheduler

__all__ = ["WarmupLRScheduler"]
