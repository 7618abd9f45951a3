"""``bmtrain.nccl``: raw NCCL calls on the current CUDA stream (bmt-comm's run-time binding).

The library is the one the installed torch uses, loaded on first use, so importing this module
needs neither NCCL nor a GPU.
"""

from bmt_comm.nccl import (
    NCCLCommunicator,
    allGather,
    allReduce,
    broadcast,
    commCount,
    commDestroy,
    commInitRank,
    commRank,
    dtype2nccl,
    getUniqueId,
    groupEnd,
    groupStart,
    recv,
    reduce,
    reduceScatter,
    send,
)

from . import enums
from .enums import *  # noqa: F403 - the reference's constants (ncclInt8 ... ncclAvg)
from .enums import ncclAvg, ncclMax, ncclMin, ncclProd, ncclSum

__all__ = [
    "NCCLCommunicator",
    "getUniqueId",
    "commInitRank",
    "commDestroy",
    "commCount",
    "commRank",
    "allReduce",
    "broadcast",
    "reduce",
    "allGather",
    "reduceScatter",
    "send",
    "recv",
    "groupStart",
    "groupEnd",
    "dtype2nccl",
    "op2nccl",
    *enums.__all__,
]

_OPS = {"sum": ncclSum, "prod": ncclProd, "max": ncclMax, "min": ncclMin, "avg": ncclAvg}


def op2nccl(op: str) -> int:
    """NCCL's number for a reduction named as 1.0.1 names them (``"sum"`` -> ``ncclSum``)."""
    if op not in _OPS:
        raise ValueError(f"op must be one of {list(_OPS)}, got {op!r}")
    return _OPS[op]
