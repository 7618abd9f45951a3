"""The one place bmt-comm keeps mutable state: :class:`ProcessState`, reached by :func:`process_state`.

Every other module of bmt-comm holds only constants; what changes at run time lives here:

- ``context``: the :class:`DistContext` of the current ``init_distributed`` (None before it and
  after ``destroy``), read by :func:`get_context`;
- ``generation``: how many times this process has initialized; each init names its store keys
  (NCCL unique ids, failure reports) with it, so a re-init never reads a stale id;
- ``nccl_library``: the libnccl binding, loaded on first NCCL use (``bmt_comm.nccl.get_library``);
- ``watchdog`` (and its lock): the NCCL watchdog thread, started on the first watched collective;
- ``nccl_groups``: each thread's ``groupStart``/``groupEnd`` nesting (NCCL groups are per thread).
"""

from __future__ import annotations

import contextlib
import datetime
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import Store

from .communicator import Backend, Communicator
from .streams import Streams
from .topology import GroupKind, Topology

if TYPE_CHECKING:
    from .nccl._binding import NcclLibrary
    from .nccl.watchdog import Watchdog

__all__ = [
    "Communicators",
    "DistContext",
    "NcclGroupState",
    "ProcessState",
    "Settings",
    "get_context",
    "is_initialized",
    "process_state",
]

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
    backend: Backend  # NCCL (bmt's runtime-loaded NCCL) or TORCH (torch.distributed transport)
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


class NcclGroupState(threading.local):
    """One thread's open ``bmt.nccl.groupStart`` nesting, and the Communicators joined into it."""

    def __init__(self) -> None:
        self.depth = 0
        self.stack: contextlib.ExitStack | None = None
        self.joined: set[int] = set()


@dataclass
class ProcessState:
    """Everything bmt-comm changes at run time, for the life of the process (see the module doc)."""

    context: DistContext | None = None
    generation: int = 0  # inits so far; names the init's store keys
    nccl_library: NcclLibrary | None = None  # loaded on first NCCL use
    watchdog: Watchdog | None = None  # started on the first watched NCCL collective
    watchdog_lock: threading.Lock = field(default_factory=threading.Lock)  # guards ``watchdog``
    nccl_groups: NcclGroupState = field(default_factory=NcclGroupState)
    # other packages' process-lifetime state, by its class (see ``slot``): caches and warn-once
    # records that outlive any one init; bmt-comm never reads it
    slots: dict[type, object] = field(default_factory=dict, repr=False)
    slots_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)  # first use races

    def slot(self, kind: type[_T]) -> _T:
        """The process's one ``kind()``, made on first use (e.g. bmt-zero's background saver)."""
        with self.slots_lock:
            obj = self.slots.get(kind)
            if obj is None:
                obj = self.slots[kind] = kind()
        if not isinstance(obj, kind):
            raise TypeError(f"process slot {kind.__qualname__} holds a {type(obj).__qualname__}")
        return obj

    def next_generation(self) -> int:
        """A number no earlier init of this process used (every rank counts alike)."""
        self.generation += 1
        return self.generation


_PROCESS = ProcessState()


def process_state() -> ProcessState:
    """The process's one :class:`ProcessState`."""
    return _PROCESS


def is_initialized() -> bool:
    return _PROCESS.context is not None


def get_context() -> DistContext:
    """The state set up by ``init_distributed``; a RuntimeError that says so before it."""
    ctx = _PROCESS.context
    if ctx is None:
        raise RuntimeError(
            "BMTrain is not initialized: call bmt.init_distributed() "
            "(bmt_comm.init_distributed()) before using distributed parameters or collectives"
        )
    return ctx


def _set_context(ctx: DistContext | None) -> None:
    _PROCESS.context = ctx
