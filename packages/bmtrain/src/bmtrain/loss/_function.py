"""BMTrain 1.0.1's ``bmtrain.loss._function``: the fused-kernel functions, in torch on any device."""

from bmt_optim.loss.functional import (
    cross_entropy_backward_inplace,
    cross_entropy_forward,
    fused_softmax_inplace,
    fused_sumexp,
    has_inf_nan,
)

__all__ = [
    "has_inf_nan",
    "cross_entropy_forward",
    "cross_entropy_backward_inplace",
    "fused_sumexp",
    "fused_softmax_inplace",
]
