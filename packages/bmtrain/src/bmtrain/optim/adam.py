"""BMTrain 1.0.1's ``bmtrain.optim.adam``."""

from bmt_optim import AdamOptimizer

__all__ = ["AdamOptimizer"]
