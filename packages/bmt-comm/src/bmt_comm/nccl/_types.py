"""NCCL's data-type and reduction enums, and how torch dtypes and bmt's ``ReduceOp`` map to them."""

from __future__ import annotations

from collections.abc import Mapping
from enum import IntEnum
from types import MappingProxyType

import torch

from ..communicator import ReduceOp

__all__ = ["NcclDataType", "NcclRedOp", "SUPPORTED_DTYPES", "nccl_dtype", "nccl_op"]


class NcclDataType(IntEnum):
    """``ncclDataType_t`` (values fixed by nccl.h)."""

    INT8 = 0
    UINT8 = 1
    INT32 = 2
    UINT32 = 3
    INT64 = 4
    UINT64 = 5
    FLOAT16 = 6
    FLOAT32 = 7
    FLOAT64 = 8
    BFLOAT16 = 9


class NcclRedOp(IntEnum):
    """``ncclRedOp_t`` built-ins (AVG needs NCCL >= 2.10)."""

    SUM = 0
    PROD = 1
    MAX = 2
    MIN = 3
    AVG = 4


_DTYPES: Mapping[torch.dtype, NcclDataType] = MappingProxyType({
    torch.int8: NcclDataType.INT8,
    torch.uint8: NcclDataType.UINT8,
    torch.int32: NcclDataType.INT32,
    torch.int64: NcclDataType.INT64,
    torch.float16: NcclDataType.FLOAT16,
    torch.bfloat16: NcclDataType.BFLOAT16,
    torch.float32: NcclDataType.FLOAT32,
    torch.float64: NcclDataType.FLOAT64,
    torch.bool: NcclDataType.UINT8,  # one byte of 0/1; reductions below keep it 0/1
})

SUPPORTED_DTYPES: tuple[torch.dtype, ...] = tuple(_DTYPES)

_OPS: Mapping[ReduceOp, NcclRedOp] = MappingProxyType({
    ReduceOp.SUM: NcclRedOp.SUM,
    ReduceOp.PROD: NcclRedOp.PROD,
    ReduceOp.MAX: NcclRedOp.MAX,
    ReduceOp.MIN: NcclRedOp.MIN,
    ReduceOp.AVG: NcclRedOp.AVG,
})

# bool reduces as logical or (sum, max, avg) or logical and (min, prod), as the torch transport does
_BOOL_OPS: Mapping[ReduceOp, NcclRedOp] = MappingProxyType({
    ReduceOp.SUM: NcclRedOp.MAX,
    ReduceOp.MAX: NcclRedOp.MAX,
    ReduceOp.AVG: NcclRedOp.MAX,
    ReduceOp.MIN: NcclRedOp.MIN,
    ReduceOp.PROD: NcclRedOp.MIN,
})


def nccl_dtype(dtype: torch.dtype) -> NcclDataType:
    try:
        return _DTYPES[dtype]
    except KeyError:
        names = ", ".join(str(d).removeprefix("torch.") for d in _DTYPES)
        raise TypeError(f"NCCL does not support dtype {dtype}; supported: {names}") from None


def nccl_op(op: ReduceOp | str, dtype: torch.dtype) -> NcclRedOp:
    """The NCCL reduction for ``op`` on tensors of ``dtype`` (bool maps to max/min)."""
    parsed = ReduceOp.parse(op)
    return _BOOL_OPS[parsed] if dtype == torch.bool else _OPS[parsed]
