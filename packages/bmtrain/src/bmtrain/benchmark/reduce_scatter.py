"""BMTrain 1.0.1's ``bmtrain.benchmark.reduce_scatter``."""

from ._ops import reduce_scatter

__all__ = ["reduce_scatter"]
