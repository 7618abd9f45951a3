"""The one object that holds a process's distributed state after ``init_distributed``."""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import TypeVar

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import Store

from .communicator import Communicator
from .streams import Streams
from .topology import GroupKind, Topology

__all__ = ["Communicators", "DistContext", "Settings", "get_context", "is_initialized"]

_T = TypeVar("_T")


@dataclass(frozen=True)
class Communicators:
    """This rank's communicator of each kind. Kinds with the same members share one object."""

    world: Communicator
    zero: Communicator
    tp: Communicator
    tp_zero: Communicator
    pipe: Communicator
    pp_zero: Communicator
    pp_tp_zero: Communicator

    def get(self, kind: GroupKind) -> Communicator:
        comm: Communicator = getattr(self, kind.value)
        return comm

    def unique(self) -> list[Communicator]:
        seen: dict[int, Communicator] = {}
        for kind in GroupKind:
            c = self.get(kind)
            seen.setdefault(id(c), c)
        return list(seen.values())


@dataclass
class Settings:
    """The few run-time switches users may flip after init."""

    save_param_to_cpu: bool = True  # state_dict moves gathered parameters to CPU


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    local_size: int
    device: torch.device
    topology: Topology
    comms: Communicators
    streams: Streams
    backend: str  # "nccl" (bmt's runtime-loaded NCCL) or "torch" (torch.distributed transport)
    pipe_enabled: bool  # pipe_size > 0 was passed, even 1
    micros: int  # pipeline micro-batches
    seed: int
    timeout: datetime.timedelta  # every collective of bmt's groups (init_distributed(timeout=...))
    owns_default_group: bool  # we created torch's default group, so destroy() tears it down
    store: Store | None
    object_groups: dict[tuple[int, ...], dist.ProcessGroup]  # gloo groups for pickled objects
    settings: Settings = field(default_factory=Settings)
    # other packages' per-context state, by its class (see ``slot``); bmt-comm never reads it
    slots: dict[type, object] = field(default_factory=dict, repr=False)

    def slot(self, kind: type[_T]) -> _T:
        """This context's one ``kind()``, made on first use: state that another package keeps per
        ``init_distributed`` (e.g. bmt-ckpt's Block scheduler), gone with the context."""
        obj = self.slots.get(kind)
        if obj is None:
            obj = self.slots[kind] = kind()
        if not isinstance(obj, kind):
            raise TypeError(f"context slot {kind.__qualname__} holds a {type(obj).__qualname__}")
        return obj


_CONTEXT: DistContext | None = None


def is_initialized() -> bool:
    return _CONTEXT is not None


def get_context() -> DistContext:
    """The state set up by ``init_distributed``; a RuntimeError that says so before it."""
    if _CONTEXT is None:
        raise RuntimeError(
            "BMTrain is not initialized: call bmt.init_distributed() "
            "(bmt_comm.init_distributed()) before using distributed parameters or collectives"
        )
    return _CONTEXT


def _set_context(ctx: DistContext | None) -> None:
    global _CONTEXT
    _CONTEXT = ctx
