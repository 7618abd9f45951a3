"""``bmtrain.layer``: the module whose DistributedParameters read as full tensors in ``forward``."""

from bmt_zero import DistributedModule

__all__ = ["DistributedModule"]
