"""``bmtrain.optim``: Adam on the GPU (fused) or offloaded to the CPU, and the loss-scaling manager."""

from . import _distributed as _distributed  # 1.0.1's private modules, reachable as in 1.0.1
from . import _function as _function
from . import adam, adam_offload, optim_manager
from .adam import AdamOptimizer
from .adam_offload import AdamOffloadOptimizer
from .optim_manager import OptimManager

__all__ = ["AdamOptimizer", "AdamOffloadOptimizer", "OptimManager", "adam", "adam_offload", "optim_manager"]
