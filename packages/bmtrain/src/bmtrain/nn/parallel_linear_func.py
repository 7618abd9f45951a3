"""BMTrain 1.0.1's ``bmtrain.nn.parallel_linear_func``."""

from bmt_zero.nn import OpParallelLinear, ReduceType

__all__ = ["OpParallelLinear", "ReduceType"]
