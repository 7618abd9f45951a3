"""Rank layout of the zero, tensor-parallel and pipeline groups (BMTrain 1.0.1 numbering).

The pipeline stage is the slowest-varying index and the tensor-parallel rank the fastest:
with ``S = world_size // pipe_size``, rank ``r`` is on stage ``r // S``, at position ``r % S``
inside its stage, and in tensor-parallel group ``r // tp_size`` at tp rank ``r % tp_size``.
Everything here is pure arithmetic, so it is tested without a process group.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

__all__ = ["GroupKind", "Topology"]


class GroupKind(str, Enum):
    """The communicators a rank belongs to."""

    WORLD = "world"
    ZERO = "zero"  # BMTrain's zero_comm is the world communicator
    TP = "tp"  # ranks that share one tensor-parallel group
    TP_ZERO = "tp_zero"  # ranks with the same tp rank (ZeRO over tp-split params)
    PIPE = "pipe"  # one rank per stage, same position inside the stage
    PP_ZERO = "pp_zero"  # all ranks of one stage
    PP_TP_ZERO = "pp_tp_zero"  # ranks of one stage with the same tp rank


@dataclass(frozen=True)
class Topology:
    """Where ``rank`` sits in a world of ``world_size`` split into pipe stages and tp groups."""

    rank: int
    world_size: int
    pipe_size: int = 1
    tp_size: int = 1

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {self.world_size}")
        if self.pipe_size < 1 or self.tp_size < 1:
            raise ValueError(
                f"pipe_size ({self.pipe_size}) and tp_size ({self.tp_size}) must be >= 1"
            )
        if self.world_size % (self.pipe_size * self.tp_size) != 0:
            raise ValueError(
                f"world_size ({self.world_size}) must be divisible by "
                f"pipe_size ({self.pipe_size}) * tp_size ({self.tp_size})"
            )
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank ({self.rank}) must be in [0, world_size={self.world_size})")

    # --- the reference's named indices -------------------------------------------------
    @property
    def stage_size(self) -> int:
        """Ranks per pipeline stage (``S``)."""
        return self.world_size // self.pipe_size

    @property
    def stages(self) -> int:
        return self.pipe_size

    @property
    def stage_id(self) -> int:
        return self.rank // self.stage_size

    @property
    def pipe_idx(self) -> int:
        return self.rank % self.stage_size

    @property
    def tp_id(self) -> int:
        return self.rank % self.tp_size

    @property
    def tp_idx(self) -> int:
        return self.rank // self.tp_size

    @property
    def pp_zero_idx(self) -> int:
        return self.stage_id

    @property
    def pp_zero_id(self) -> int:
        return self.pipe_idx

    @property
    def tp_zero_idx(self) -> int:
        return self.tp_id

    @property
    def tp_zero_id(self) -> int:
        return self.tp_idx

    @property
    def pp_tp_zero_idx(self) -> int:
        return self.stage_id * self.tp_size + self.tp_id

    @property
    def pp_tp_zero_id(self) -> int:
        return self.pipe_idx // self.tp_size

    @property
    def zero_idx(self) -> int:
        return 0

    @property
    def zero_id(self) -> int:
        return self.rank

    def get_group_id(self, group_name: str) -> int | None:
        """Which group of that kind this rank is in (``None`` for unknown names)."""
        return {
            "pipe": self.pipe_idx,
            "zero": self.zero_idx,
            "tp_zero": self.tp_zero_idx,
            "tp": self.tp_idx,
        }.get(group_name)

    def get_group_rank(self, group_name: str) -> int | None:
        """This rank's position inside that group (``None`` for unknown names)."""
        return {
            "pipe": self.stage_id,
            "zero": self.zero_id,
            "tp_zero": self.tp_zero_id,
            "tp": self.tp_id,
        }.get(group_name)

    # --- group membership -------------------------------------------------------------
    def all_groups(self, kind: GroupKind) -> list[tuple[int, ...]]:
        """Every group of ``kind`` as sorted global ranks, in a rank-independent order.

        Each rank must create the process groups in this same order.
        """
        w, s, tp = self.world_size, self.stage_size, self.tp_size
        if kind in (GroupKind.WORLD, GroupKind.ZERO):
            return [tuple(range(w))]
        if kind is GroupKind.TP:
            return [tuple(range(g * tp, (g + 1) * tp)) for g in range(w // tp)]
        if kind is GroupKind.TP_ZERO:
            return [tuple(range(t, w, tp)) for t in range(tp)]
        if kind is GroupKind.PIPE:
            return [tuple(range(p, w, s)) for p in range(s)]
        if kind is GroupKind.PP_ZERO:
            return [tuple(range(st * s, (st + 1) * s)) for st in range(self.pipe_size)]
        if kind is GroupKind.PP_TP_ZERO:
            return [
                tuple(range(st * s + t, (st + 1) * s, tp))
                for st in range(self.pipe_size)
                for t in range(tp)
            ]
        raise ValueError(f"unknown group kind {kind!r}")

    def group_ranks(self, kind: GroupKind) -> tuple[int, ...]:
        """The global ranks of this rank's group of ``kind``."""
        for ranks in self.all_groups(kind):
            if self.rank in ranks:
                return ranks
        raise AssertionError(f"rank {self.rank} is in no {kind.value} group")  # unreachable

    def rank_in_group(self, kind: GroupKind) -> int:
        return self.group_ranks(kind).index(self.rank)
