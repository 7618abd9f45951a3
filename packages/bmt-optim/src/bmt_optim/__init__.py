"""bmt-optim: BMTrain's optimizers, loss scaling, LR schedulers and fused kernels."""

from . import loss, lr_scheduler
from .adam import AdamOptimizer
from .adam_offload import AdamOffloadOptimizer
from .grad_clip import global_grad_norm
from .loss import FusedCrossEntropy
from .nan_check import check_inf_nan_, check_inf_nan_many_, has_inf_nan, new_flag
from .optim_manager import NonFiniteGradientWarning, OptimManager

__all__ = [
    "AdamOffloadOptimizer",
    "AdamOptimizer",
    "FusedCrossEntropy",
    "NonFiniteGradientWarning",
    "OptimManager",
    "check_inf_nan_",
    "check_inf_nan_many_",
    "global_grad_norm",
    "has_inf_nan",
    "loss",
    "lr_scheduler",
    "new_flag",
]
