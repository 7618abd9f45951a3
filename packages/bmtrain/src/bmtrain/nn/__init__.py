"""``bmtrain.nn``: linear layers and a vocab-parallel embedding for tensor parallelism."""

from bmt_zero.nn import (
    ColumnParallelLinear,
    Linear,
    OpLinear,
    OpParallelLinear,
    ReduceType,
    RowParallelLinear,
    VPEmbedding,
)

__all__ = [
    "Linear",
    "OpLinear",
    "ColumnParallelLinear",
    "RowParallelLinear",
    "VPEmbedding",
    "OpParallelLinear",
    "ReduceType",
]
