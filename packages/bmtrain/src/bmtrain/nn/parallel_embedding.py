"""BMTrain 1.0.1's ``bmtrain.nn.parallel_embedding``."""

from bmt_zero.nn import VPEmbedding

__all__ = ["VPEmbedding"]
