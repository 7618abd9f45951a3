"""BMTrain 1.0.1's ``bmtrain.optim.adam_offload``."""

from bmt_optim import AdamOffloadOptimizer

__all__ = ["AdamOffloadOptimizer"]
