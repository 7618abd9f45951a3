"""``bmtrain.optim``: Adam on the GPU (fused) or offloaded to the CPU, and the loss-scaling manager."""

from bmt_optim import AdamOffloadOptimizer, AdamOptimizer, OptimManager

__all__ = ["AdamOptimizer", "AdamOffloadOptimizer", "OptimManager"]
