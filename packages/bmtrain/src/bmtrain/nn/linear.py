"""BMTrain 1.0.1's ``bmtrain.nn.linear``."""

from bmt_zero.nn import Linear, OpLinear

__all__ = ["Linear", "OpLinear"]
