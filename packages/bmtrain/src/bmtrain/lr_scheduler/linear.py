"""BMTrain 1.0.1's ``bmtrain.lr_scheduler.linear``."""

from bmt_optim.lr_scheduler.linear import Linear

__all__ = ["Linear"]
