"""``rank()``/``world_size()``, and the reference's printing helpers (see :mod:`bmt_comm.printing`)."""

from __future__ import annotations

from . import printing
from .context import get_context, is_initialized
from .printing import *  # noqa: F403  # print_rank and friends, listed once there

__all__ = ["rank", "world_size"]
__all__ += printing.__all__


def rank() -> int:
    """Global rank (0 before init)."""
    return get_context().rank if is_initialized() else 0


def world_size() -> int:
    """World size (1 before init)."""
    return get_context().world_size if is_initialized() else 1
