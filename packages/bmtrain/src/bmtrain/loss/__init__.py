"""``bmtrain.loss``: cross-entropy with a fused half-precision kernel and a vocab-parallel mode."""

from bmt_optim.loss import FusedCrossEntropy

__all__ = ["FusedCrossEntropy"]
