"""bmt-zero: ZeRO-sharded parameters and modules, flat sharded storage, checkpoints, tensor-parallel layers."""

from .parameter import DistributedParameter, InitMethod, ParameterInitializer
from .partition import Partition

__all__ = ["DistributedParameter", "InitMethod", "ParameterInitializer", "Partition"]
