"""BMTrain 1.0.1's ``bmtrain.benchmark.all_gather``."""

from ._ops import all_gather

__all__ = ["all_gather"]
