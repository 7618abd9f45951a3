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
    *enums.__all__,
]
