"""NCCL data-type and reduction-op numbers (``bmtrain.nccl.enums`` in BMTrain 1.0.1)."""

from bmt_comm.nccl import enums as _enums
from bmt_comm.nccl.enums import *  # noqa: F403  # the names, listed once in bmt_comm.nccl.enums

__all__: list[str] = []
__all__ += _enums.__all__
