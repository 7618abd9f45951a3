"""``bmtrain.nccl``: raw NCCL calls on the current CUDA stream (bmt-comm's run-time binding).

The library is the one the installed torch uses, loaded on first use, so importing this module
needs neither NCCL nor a GPU. The names are those of :mod:`bmt_comm.nccl.api` and
:mod:`bmt_comm.nccl.enums`.
"""

from bmt_comm.nccl import api
from bmt_comm.nccl.api import *  # noqa: F403  # the reference's functions, listed once there
from bmt_comm.nccl.enums import *  # noqa: F403  # and constants

from . import enums as enums  # the reference's sub-module path

__all__: list[str] = []
__all__ += api.__all__
__all__ += enums.__all__
