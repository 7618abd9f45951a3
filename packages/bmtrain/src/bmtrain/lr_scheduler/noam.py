"""BMTrain 1.0.1's ``bmtrain.lr_scheduler.noam``."""

from bmt_optim.lr_scheduler.noam import Noam

__all__ = ["Noam"]
