"""BMTrain 1.0.1's ``bmtrain.loss.cross_entropy``: the module and its two autograd functions."""

from bmt_optim.loss import FusedCrossEntropy
from bmt_optim.loss.ops import OpFusedCrossEntropy, VPFusedCrossEntropy

__all__ = ["FusedCrossEntropy", "OpFusedCrossEntropy", "VPFusedCrossEntropy"]
