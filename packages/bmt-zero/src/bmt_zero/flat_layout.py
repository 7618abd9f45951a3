"""Where the parameters of one flat buffer live: pure arithmetic, no communication.

For the parameters of one unit (a Block), one buffer is built per ``BufferKey`` (dtype,
requires_grad, group, tp_mode). Parameters are laid out in order, each offset aligned to
``ALIGN_BYTES``, the total padded so that it splits evenly (and aligned) over the ``world``
ranks of the buffer's communicator; rank ``r`` owns the contiguous partition
``[r * total / world, (r + 1) * total / world)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .parameter import DistributedParameter

__all__ = ["ALIGN_BYTES", "BufferKey", "FlatLayout", "FlatSlot", "plan_layout"]

ALIGN_BYTES = 512


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


@dataclass(frozen=True)
class BufferKey:
    """What parameters must share to live in one flat buffer."""

    dtype: torch.dtype
    requires_grad: bool
    group: str | None
    tp_mode: bool = False  # tensor-parallel params use another communicator (tp_zero)

    @property
    def name(self) -> str:
        """The reference's key, e.g. ``float16_grad`` or ``float32_nograd_g_embed``."""
        name = f"{str(self.dtype).removeprefix('torch.')}_{'grad' if self.requires_grad else 'nograd'}"
        if self.group is not None:
            name += f"_g_{self.group}"
        if self.tp_mode and self.group != "tp":
            name += "_tp"
        return name

    @classmethod
    def of(cls, param: DistributedParameter) -> BufferKey:
        return cls(param.dtype, param.requires_grad, param.group, param._tp_mode)


@dataclass(frozen=True)
class FlatSlot:
    """One parameter's place in the full flat buffer: elements ``[offset, offset + numel)``."""

    name: str
    shape: torch.Size
    offset: int

    @property
    def numel(self) -> int:
        return self.shape.numel()

    def local_range(self, part_start: int, part_end: int) -> tuple[int, int]:
        """Element range of the flattened parameter inside partition ``[part_start, part_end)``;
        ``start == end`` when the partition holds none of it."""
        start = min(max(part_start - self.offset, 0), self.numel)
        end = min(max(part_end - self.offset, 0), self.numel)
        return start, max(start, end)


@dataclass(frozen=True)
class FlatLayout:
    """Where each parameter of one buffer lives, and how the buffer splits over ``world`` ranks."""

    key: BufferKey
    slots: tuple[FlatSlot, ...]
    total: int  # padded: a multiple of world * alignment
    world: int

    @property
    def partition_numel(self) -> int:
        return self.total // self.world

    def partition(self, rank: int) -> tuple[int, int]:
        if not 0 <= rank < self.world:
            raise ValueError(f"rank ({rank}) must be in [0, {self.world})")
        return rank * self.partition_numel, (rank + 1) * self.partition_numel


def plan_layout(key: BufferKey, named_shapes: Sequence[tuple[str, torch.Size]], world: int) -> FlatLayout:
    """Offsets aligned to ``ALIGN_BYTES``; total padded to a multiple of ``world`` aligned partitions."""
    if world < 1:
        raise ValueError(f"world size must be >= 1, got {world}")
    itemsize = torch.empty(0, dtype=key.dtype).element_size()
    align = max(1, ALIGN_BYTES // itemsize)
    slots: list[FlatSlot] = []
    end = 0
    for name, shape in named_shapes:
        offset = _round_up(end, align)
        slots.append(FlatSlot(name, torch.Size(shape), offset))
        end = offset + slots[-1].numel
    return FlatLayout(key, tuple(slots), _round_up(end, world * align), world)
