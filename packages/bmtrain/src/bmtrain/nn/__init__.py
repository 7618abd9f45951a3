"""``bmtrain.nn``: linear layers and a vocab-parallel embedding for tensor parallelism."""

from . import column_parallel_linear, linear, parallel_embedding, parallel_linear_func, row_parallel_linear
from .column_parallel_linear import ColumnParallelLinear
from .linear import Linear, OpLinear
from .parallel_embedding import VPEmbedding
from .parallel_linear_func import OpParallelLinear, ReduceType
from .row_parallel_linear import RowParallelLinear

__all__ = [
    "Linear",
    "OpLinear",
    "ColumnParallelLinear",
    "RowParallelLinear",
    "VPEmbedding",
    "OpParallelLinear",
    "ReduceType",
    # 1.0.1's module files
    "linear",
    "column_parallel_linear",
    "row_parallel_linear",
    "parallel_embedding",
    "parallel_linear_func",
]
