"""bmt-optim: BMTrain's optimizers, loss scaling, LR schedulers and fused kernels."""

from . import loss, lr_scheduler
from .adam import AdamOptimizer
from .adam_offload import AdamOffloadOptimizer
from .grad_clip import global_grad_norm
from .loss import FusedCrossEntropy
from .nan_check import check_inf_nan_, has_inf_nan, new_flag
from .optim_manager import OptimManager

__all__ = [
    "AdamOffloadOptimizer",
    "AdamOptimizer",
    "FusedCrossEntropy",
    "OptimManager",
    "check_inf_nan_",
    "global_grad_norm",
    "has_inf_nan",
    "loss",
    "lr_scheduler",
    "new_flag",
]
