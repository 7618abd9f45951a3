"""NCCL's data-type and reduction-op numbers under the reference's names (``bmtrain.nccl.enums``).

``__all__`` here is the one list of these names: ``bmt_comm.nccl``, ``bmtrain.nccl`` and
``bmtrain.nccl.enums`` re-export it.
"""

from ._types import NcclDataType, NcclRedOp

__all__ = [
    "ncclInt8", "ncclChar", "ncclBool", "ncclUint8", "ncclInt32", "ncclInt", "ncclUint32",
    "ncclInt64", "ncclUint64", "ncclFloat16", "ncclHalf", "ncclFloat32", "ncclFloat",
    "ncclFloat64", "ncclDouble", "ncclBFloat16",
    "ncclSum", "ncclProd", "ncclMax", "ncclMin", "ncclAvg",
]

ncclInt8 = ncclChar = ncclBool = int(NcclDataType.INT8)
ncclUint8 = int(NcclDataType.UINT8)
ncclInt32 = ncclInt = int(NcclDataType.INT32)
ncclUint32 = int(NcclDataType.UINT32)
ncclInt64 = int(NcclDataType.INT64)
ncclUint64 = int(NcclDataType.UINT64)
ncclFloat16 = ncclHalf = int(NcclDataType.FLOAT16)
ncclFloat32 = ncclFloat = int(NcclDataType.FLOAT32)
ncclFloat64 = ncclDouble = int(NcclDataType.FLOAT64)
ncclBFloat16 = int(NcclDataType.BFLOAT16)
ncclSum = int(NcclRedOp.SUM)
ncclProd = int(NcclRedOp.PROD)
ncclMax = int(NcclRedOp.MAX)
ncclMin = int(NcclRedOp.MIN)
ncclAvg = int(NcclRedOp.AVG)
