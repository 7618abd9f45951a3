"""BMTrain 1.0.1's ``bmtrain.lr_scheduler.exponential``."""

from bmt_optim.lr_scheduler.exponential import Exponential

__all__ = ["Exponential"]
