"""bmt's NCCL transport: libnccl loaded at run time through ctypes (no headers, no compiler).

- :class:`NcclCommunicator`: the ``Communicator`` that ``init_distributed`` builds on GPUs;
- the reference's low-level ``bmtrain.nccl`` functions (``allGather(src, dst, comm)``, ...) and
  constants, see :mod:`bmt_comm.nccl.api` and :mod:`bmt_comm.nccl.enums` (whose ``__all__`` are
  the one list of those names);
- :func:`nccl_available` / :func:`nccl_version` and the library search (``BMT_NCCL_LIBRARY``).
"""

from . import api, enums
from ._binding import NcclError, NcclLibrary
from ._search import get_library, library_candidates, loaded_library, nccl_available
from ._types import SUPPORTED_DTYPES, NcclDataType, NcclRedOp
from .api import *  # noqa: F403  # the reference's bmtrain.nccl functions
from .communicator import NcclCommunicator
from .enums import *  # noqa: F403  # and its constants


def nccl_version() -> tuple[int, int, int]:
    """(major, minor, patch) of the libnccl bmt loads; RuntimeError when none can be loaded."""
    return get_library().version


# bmt's own names, then the reference's
__all__ = [
    "NcclCommunicator",
    "NcclDataType",
    "NcclError",
    "NcclLibrary",
    "NcclRedOp",
    "SUPPORTED_DTYPES",
    "get_library",
    "library_candidates",
    "loaded_library",
    "nccl_available",
    "nccl_version",
]
__all__ += api.__all__
__all__ += enums.__all__
