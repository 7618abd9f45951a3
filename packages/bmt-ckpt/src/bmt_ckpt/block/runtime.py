"""One Block's runtime: its phase, the (maybe shared) storage it gathers and releases, and the
Blocks that run before and after it.

A Block's parameters live in a :class:`bmt_zero.flat_storage.FlatStorage`. Before the Block runs
(forward, or backward) its storage is gathered; the neighbour that runs next (the next Block in
forward, the previous one in backward) is prefetched through the context's
:class:`~.scheduler.BlockScheduler`, so its all-gather overlaps this Block's compute; afterwards
the storage is released (ZeRO-3) or kept until the backward (ZeRO-2).

A Block's phase (:class:`BlockPhase`) moves ``IDLE -> FORWARD -> IDLE`` in forward and
``IDLE -> RECOMPUTE -> BACKWARD -> IDLE`` (``IDLE -> BACKWARD -> IDLE`` without activation
checkpointing) in backward, and back to ``IDLE`` from any phase when the run raises; any other
move (a Block started while it runs, a finish without a start) is a bug and raises.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

import torch
from bmt_zero import FlatStorage

from .scheduler import BlockScheduler

if TYPE_CHECKING:
    from .block import Block

__all__ = [
    "BlockPhase",
    "ReleasePolicy",
    "SharedStorage",
    "BlockRuntime",
    "BackwardHold",
    "PendingBackward",
    "link_after",
    "unlink_next",
]


class BlockPhase(Enum):
    """What a Block is doing now (like FSDP2's ``TrainingState``)."""

    IDLE = "idle"  # parameters are the flat shards; nothing of this Block runs
    FORWARD = "forward"  # gathered and bound full: the inner module's forward runs
    RECOMPUTE = "recompute"  # backward, use_checkpoint: bound full with gradient buffers, the forward runs again
    BACKWARD = "backward"  # the inner graph's backward runs, accumulating the full gradients


class ReleasePolicy(Enum):
    """When a Block frees its gathered parameters (its ``zero_level``)."""

    AFTER_FORWARD = 3  # ZeRO-3: free after forward, gather again for backward
    AFTER_BACKWARD = 2  # ZeRO-2: keep from forward until the backward that needs them

    @classmethod
    def from_zero_level(cls, zero_level: int) -> ReleasePolicy:
        if zero_level not in (2, 3):
            raise ValueError(f"zero_level must be 2 or 3, got {zero_level!r}")
        return cls(zero_level)


@dataclass(eq=False)
class SharedStorage:
    """A flat storage, the Block running on it now, and the ZeRO-2 graphs that keep its gather
    (Blocks made with ``reference`` share one)."""

    storage: FlatStorage
    pending_backward: int = 0  # ZeRO-2 graphs whose backward still needs the kept gather (BackwardHold)
    user: BlockRuntime | None = None  # the Block whose phase is not IDLE: its parameters are bound full

    @property
    def in_use(self) -> bool:
        return self.user is not None

    def release_if_idle(self) -> None:
        if self.pending_backward == 0 and self.user is None:
            self.storage.release()


class BackwardHold:
    """A ZeRO-2 graph's claim on the kept gather: ends at its backward, or when the graph dies."""

    def __init__(self, shared: SharedStorage) -> None:
        self._shared: SharedStorage | None = shared
        shared.pending_backward += 1

    def done(self) -> None:
        shared, self._shared = self._shared, None
        if shared is not None:
            shared.pending_backward -= 1
            shared.release_if_idle()

    def __del__(self) -> None:
        self.done()


class PendingBackward:
    """A graph through a Block whose backward has not run yet: ends at that backward, or when the
    graph dies. A Block with none (frozen, or run outside autograd) is not prefetched in backward."""

    def __init__(self, runtime: BlockRuntime) -> None:
        self._runtime: BlockRuntime | None = runtime
        runtime.pending_graphs += 1

    def done(self) -> None:
        runtime, self._runtime = self._runtime, None
        if runtime is not None:
            runtime.pending_graphs -= 1

    def __del__(self) -> None:
        self.done()


class BlockRuntime:
    """One Block's phase, its (maybe shared) storage, the context's scheduler, and the Blocks that
    run right before and after it (the only place these links live)."""

    def __init__(self, shared: SharedStorage, policy: ReleasePolicy, scheduler: BlockScheduler) -> None:
        self.shared = shared
        self.policy = policy
        self.scheduler = scheduler
        self.phase = BlockPhase.IDLE
        self.pending_graphs = 0  # graphs through this Block still to run backward (PendingBackward)
        self._pre: Block | None = None  # runs right before this Block in forward
        self._next: Block | None = None  # runs right after this Block in forward

    @property
    def storage(self) -> FlatStorage:
        return self.shared.storage

    # --- neighbours (prefetch order; changed only by link_after and unlink_next) ----------
    def pre_block(self) -> Block | None:
        return self._pre

    def next_block(self) -> Block | None:
        return self._next

    # --- one use: acquire, bind, (advance), finish -----------------------------------------
    def _move(self, to: BlockPhase, allowed_from: tuple[BlockPhase, ...]) -> None:
        if self.phase not in allowed_from:
            names = " or ".join(p.name for p in allowed_from)
            raise RuntimeError(
                f"a Block's phase cannot go from {self.phase.name} to {to.name} (only from {names}); "
                "a Block ran while it was already running (its inner module called it again?), or this is a bug"
            )
        self.phase = to

    def acquire(self, phase: BlockPhase) -> None:
        """``IDLE -> phase``: gather (or take the prefetched gather), prefetch the neighbour that
        runs next (the next Block in forward, the previous one in backward)."""
        if phase is BlockPhase.IDLE:
            raise ValueError("acquire() starts a phase: FORWARD, RECOMPUTE or BACKWARD, not IDLE")
        self._move(phase, (BlockPhase.IDLE,))
        try:
            self._gather(phase)
        except BaseException:
            self.phase = BlockPhase.IDLE
            raise

    def _gather(self, phase: BlockPhase) -> None:
        shared, scheduler = self.shared, self.scheduler
        if shared.user is not None:
            raise RuntimeError(
                f"a Block's parameters are bound full by another Block sharing its storage (in {shared.user.phase.name}); "
                "Blocks made with reference() cannot run inside one another"
            )
        forward = phase is BlockPhase.FORWARD
        if forward:
            scheduler.forward_started()
        prefetched = scheduler.claim(shared)
        if forward and not prefetched:
            # a kept (ZeRO-2) gather may predate an optimizer step: a forward always gathers afresh
            self.storage.gather_async(force=True)
        self.storage.wait()  # backward: the kept gather, the prefetched one, or a new one
        neighbour = self._next if forward else self._pre
        if neighbour is not None and neighbour.runtime.shared is not shared:
            # in backward only a Block that will run backward too: never a frozen lower layer
            if forward or neighbour.runtime.pending_graphs > 0:
                scheduler.prefetch(neighbour.runtime.shared)
        shared.user = self

    def bind(self, grads: list[torch.Tensor | None] | None = None) -> None:
        """The inner module's parameters become views of the gathered storage (and ``grads``)."""
        if self.phase is BlockPhase.IDLE:
            raise RuntimeError("bind() needs an acquired Block (phase FORWARD, RECOMPUTE or BACKWARD), it is IDLE")
        self.storage.bind_full(grads)

    def advance(self, phase: BlockPhase) -> None:
        """``RECOMPUTE -> BACKWARD``: the recomputed graph is built, its backward runs next."""
        if phase is not BlockPhase.BACKWARD:
            raise ValueError(f"advance() moves RECOMPUTE to BACKWARD only, got {phase.name}")
        self._move(phase, (BlockPhase.RECOMPUTE,))

    def finish(self) -> None:
        """``-> IDLE``: params back to their shards; free the gather unless a ZeRO-2 backward
        still needs it."""
        self._move(BlockPhase.IDLE, (BlockPhase.FORWARD, BlockPhase.RECOMPUTE, BlockPhase.BACKWARD))
        shared = self.shared
        shared.user = None
        self.storage.bind_shard()
        shared.release_if_idle()

    def hold_for_backward(self) -> BackwardHold | None:
        return BackwardHold(self.shared) if self.policy is ReleasePolicy.AFTER_BACKWARD else None


def link_after(block: Block, pre: Block | None) -> None:
    """``block`` runs right after ``pre`` in forward (and right before it in backward): each
    prefetches the other. ``block``'s old previous Block forgets it as its next."""
    runtime = block.runtime
    pre_runtime = None if pre is None else pre.runtime  # raises before any change if pre has no storage
    old = runtime._pre
    if old is not None and old.runtime._next is block:
        old.runtime._next = None
    runtime._pre = pre
    if pre_runtime is not None:
        pre_runtime._next = block


def unlink_next(block: Block) -> None:
    """``block`` is last: nothing runs after it (and its old next Block forgets it)."""
    runtime = block.runtime
    nxt = runtime._next
    if nxt is not None and nxt.runtime._pre is block:
        nxt.runtime._pre = None
    runtime._next = None
