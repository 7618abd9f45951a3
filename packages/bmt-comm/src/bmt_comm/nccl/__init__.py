"""bmt's NCCL transport: libnccl loaded at run time through ctypes (no headers, no compiler).

- :class:`NcclCommunicator`: the ``Communicator`` that ``init_distributed`` builds on GPUs;
- the reference's low-level ``bmtrain.nccl`` functions (``allGather(src, dst, comm)``, ...), see
  :mod:`bmt_comm.nccl.api`;
- :func:`nccl_available` / :func:`nccl_version` and the library search (``BMT_NCCL_LIBRARY``).
"""

from ._handle import NCCLCommunicator
from ._library import NcclError, NcclLibrary, get_library, library_candidates, nccl_available
from ._types import SUPPORTED_DTYPES, NcclDataType, NcclRedOp
from .api import (
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
    ncclAvg,
    ncclBFloat16,
    ncclBool,
    ncclChar,
    ncclDouble,
    ncclFloat,
    ncclFloat16,
    ncclFloat32,
    ncclFloat64,
    ncclHalf,
    ncclInt,
    ncclInt8,
    ncclInt32,
    ncclInt64,
    ncclMax,
    ncclMin,
    ncclProd,
    ncclSum,
    ncclUint8,
    ncclUint32,
    ncclUint64,
    recv,
    reduce,
    reduceScatter,
    send,
)
from .communicator import NcclCommunicator


def nccl_version() -> tuple[int, int, int]:
    """(major, minor, patch) of the libnccl bmt loads; RuntimeError when none can be loaded."""
    return get_library().version


__all__ = [
    "NCCLCommunicator",
    "NcclCommunicator",
    "NcclDataType",
    "NcclError",
    "NcclLibrary",
    "NcclRedOp",
    "SUPPORTED_DTYPES",
    "allGather",
    "allReduce",
    "broadcast",
    "commCount",
    "commDestroy",
    "commInitRank",
    "commRank",
    "dtype2nccl",
    "get_library",
    "getUniqueId",
    "groupEnd",
    "groupStart",
    "library_candidates",
    "nccl_available",
    "nccl_version",
    "ncclAvg",
    "ncclBFloat16",
    "ncclBool",
    "ncclChar",
    "ncclDouble",
    "ncclFloat",
    "ncclFloat16",
    "ncclFloat32",
    "ncclFloat64",
    "ncclHalf",
    "ncclInt",
    "ncclInt8",
    "ncclInt32",
    "ncclInt64",
    "ncclMax",
    "ncclMin",
    "ncclProd",
    "ncclSum",
    "ncclUint8",
    "ncclUint32",
    "ncclUint64",
    "recv",
    "reduce",
    "reduceScatter",
    "send",
]
