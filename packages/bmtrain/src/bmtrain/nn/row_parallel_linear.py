"""BMTrain 1.0.1's ``bmtrain.nn.row_parallel_linear``."""

from bmt_zero.nn import RowParallelLinear

__all__ = ["RowParallelLinear"]
