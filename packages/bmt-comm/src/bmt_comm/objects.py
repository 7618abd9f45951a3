"""Python objects across ranks (pickled through torch.distributed's object collectives)."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist

from .communicator import Communicator
from .context import get_context
from .timeouts import guard

__all__ = ["broadcast_object", "allgather_objects"]


def _process_group(comm: Communicator | None) -> dist.ProcessGroup | None:
    """The torch group with ``comm``'s members (objects always travel on a CPU/gloo-capable group)."""
    ctx = get_context()
    comm = comm or ctx.comms.world
    group = ctx.object_groups.get(comm.global_ranks)
    if group is None:
        raise ValueError(
            f"objects travel only on the communicators of bmt_comm.get_context().comms; "
            f"no group has ranks {list(comm.global_ranks)}"
        )
    return group


def broadcast_object(obj: Any, comm: Communicator | None = None, src: int = 0) -> Any:
    """``obj`` from group rank ``src`` of ``comm`` (the world by default), returned on every member."""
    ctx = get_context()
    comm = comm or ctx.comms.world
    if not 0 <= src < comm.size:
        raise ValueError(f"src ({src}) must be a rank in [0, {comm.size}) of this group")
    if comm.size == 1:
        return obj
    box = [obj]
    with guard("broadcast_object", comm.global_ranks, comm.global_ranks[comm.rank], ctx.timeout):
        dist.broadcast_object_list(box, src=comm.global_ranks[src], group=_process_group(comm))
    return box[0]


def allgather_objects(obj: Any, comm: Communicator | None = None) -> list[Any]:
    """Every member's ``obj``, in group-rank order."""
    ctx = get_context()
    comm = comm or ctx.comms.world
    if comm.size == 1:
        return [obj]
    out: list[Any] = [None] * comm.size
    with guard("allgather_objects", comm.global_ranks, comm.global_ranks[comm.rank], ctx.timeout):
        dist.all_gather_object(out, obj, group=_process_group(comm))
    return out
