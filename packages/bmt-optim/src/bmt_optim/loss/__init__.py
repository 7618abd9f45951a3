"""Losses (BMTrain's ``bmt.loss``)."""

from .cross_entropy import FusedCrossEntropy, Reduction, fused_cross_entropy

__all__ = ["FusedCrossEntropy", "Reduction", "fused_cross_entropy"]
