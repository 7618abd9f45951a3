"""``bmtrain.loss``: cross-entropy with a fused half-precision kernel and a vocab-parallel mode."""

from . import _function as _function  # 1.0.1's kernel functions, reachable as in 1.0.1
from . import cross_entropy
from .cross_entropy import FusedCrossEntropy

__all__ = ["FusedCrossEntropy", "cross_entropy"]
