"""Tensor-parallel layers (the reference's ``bmtrain.nn``)."""

from ._tp_ops import OpParallelLinear, ReduceType
from .embedding import VPEmbedding
from .linear import Linear, OpLinear
from .parallel_linear import ColumnParallelLinear, RowParallelLinear

__all__ = [
    "ColumnParallelLinear",
    "Linear",
    "OpLinear",
    "OpParallelLinear",
    "ReduceType",
    "RowParallelLinear",
    "VPEmbedding",
]
