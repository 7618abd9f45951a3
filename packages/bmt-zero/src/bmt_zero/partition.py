"""Even, padded partition of a flattened tensor over a group: pure arithmetic."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Partition"]


@dataclass(frozen=True)
class Partition:
    """Rank ``rank`` of ``size`` owns elements ``[start, end)`` of a tensor of ``numel`` elements.

    Every rank holds ``shard_numel = ceil(numel / size)`` slots; the last ranks' slots may be
    partly or wholly padding, so ``end - start`` (the real elements) can be smaller, even 0.
    """

    numel: int
    size: int
    rank: int

    def __post_init__(self) -> None:
        if self.numel < 0 or self.size < 1 or not 0 <= self.rank < self.size:
            raise ValueError(f"invalid partition: numel={self.numel}, size={self.size}, rank={self.rank}")

    @property
    def shard_numel(self) -> int:
        return (self.numel + self.size - 1) // self.size

    @property
    def padded_numel(self) -> int:
        return self.shard_numel * self.size

    @property
    def start(self) -> int:
        return min(self.numel, self.rank * self.shard_numel)

    @property
    def end(self) -> int:
        return min(self.numel, (self.rank + 1) * self.shard_numel)

    @property
    def local_numel(self) -> int:
        return self.end - self.start
