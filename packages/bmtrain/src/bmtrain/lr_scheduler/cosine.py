"""BMTrain 1.0.1's ``bmtrain.lr_scheduler.cosine``."""

from bmt_optim.lr_scheduler.cosine import Cosine

__all__ = ["Cosine"]
