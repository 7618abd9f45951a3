"""``bmtrain.parameter``: ZeRO-sharded parameters."""

from bmt_zero import DistributedParameter, ParameterInitializer

__all__ = ["DistributedParameter", "ParameterInitializer"]
