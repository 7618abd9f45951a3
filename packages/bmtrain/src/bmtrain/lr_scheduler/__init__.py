"""``bmtrain.lr_scheduler``: warm-up then decay schedules that set the lr on construction."""

from bmt_optim.lr_scheduler import Cosine, Exponential, Linear, Noam, NoDecay, WarmupLRScheduler

__all__ = ["WarmupLRScheduler", "NoDecay", "Noam", "Linear", "Cosine", "Exponential"]
