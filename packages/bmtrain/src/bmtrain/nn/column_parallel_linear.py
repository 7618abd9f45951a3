"""BMTrain 1.0.1's ``bmtrain.nn.column_parallel_linear``."""

from bmt_zero.nn import ColumnParallelLinear

__all__ = ["ColumnParallelLinear"]
