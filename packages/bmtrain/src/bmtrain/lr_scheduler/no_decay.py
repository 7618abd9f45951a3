"""BMTrain 1.0.1's ``bmtrain.lr_scheduler.no_decay``."""

from bmt_optim.lr_scheduler.no_decay import NoDecay

__all__ = ["NoDecay"]
