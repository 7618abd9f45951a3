"""Pipeline arithmetic: which layers each stage runs, how a batch splits into micro-batches.

Pure logic, no process group. The schedule itself is GPipe through autograd (see ``pipeline``):
each stage runs every micro-batch forward in order, and autograd runs their backwards in reverse
order, the same order on every stage, so the point-to-point sends and receives pair up.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["StagePartition", "MicroBatches"]


@dataclass(frozen=True)
class StagePartition:
    """``num_layers`` consecutive layers over ``stages`` stages: stage ``s`` runs
    ``num_layers // stages + (s < num_layers % stages)`` of them."""

    num_layers: int
    stages: int

    def __post_init__(self) -> None:
        if self.stages < 1:
            raise ValueError(f"the number of pipeline stages must be >= 1, got {self.stages}")
        if self.num_layers < self.stages:
            raise ValueError(
                f"a pipeline of {self.stages} stages needs at least {self.stages} layers "
                f"(one per stage), got {self.num_layers}"
            )

    def _check_stage(self, stage_id: int) -> None:
        if not 0 <= stage_id < self.stages:
            raise ValueError(f"stage_id ({stage_id}) must be in [0, {self.stages})")

    def part_len(self, stage_id: int) -> int:
        self._check_stage(stage_id)
        base, extra = divmod(self.num_layers, self.stages)
        return base + (stage_id < extra)

    def range_of(self, stage_id: int) -> range:
        self._check_stage(stage_id)
        base, extra = divmod(self.num_layers, self.stages)
        start = stage_id * base + min(stage_id, extra)
        return range(start, start + self.part_len(stage_id))

    def stage_of(self, layer_id: int) -> int:
        if not 0 <= layer_id < self.num_layers:
            raise ValueError(f"layer_id ({layer_id}) must be in [0, {self.num_layers})")
        base, extra = divmod(self.num_layers, self.stages)
        boundary = extra * (base + 1)  # the first `extra` stages run one layer more
        if layer_id < boundary:
            return layer_id // (base + 1)
        return extra + (layer_id - boundary) // base


@dataclass(frozen=True)
class MicroBatches:
    """The pipe group's batch: ``members`` ranks each bring ``local`` rows, concatenated in
    pipe-rank order, then cut into ``micros`` consecutive micro-batches of near-equal size."""

    local: int  # rows each pipe rank brings
    members: int  # ranks in the pipe group (= stages)
    micros: int

    def __post_init__(self) -> None:
        if self.micros < 1:
            raise ValueError(f"num_micro_batches must be >= 1, got {self.micros}")
        if self.total < self.micros:
            raise ValueError(
                f"the pipe group's batch ({self.members} ranks x {self.local} rows = {self.total}) "
                f"must have at least num_micro_batches ({self.micros}) rows"
            )

    @property
    def total(self) -> int:
        return self.local * self.members

    @property
    def sizes(self) -> tuple[int, ...]:
        """Rows of each micro-batch: the first ``total % micros`` get one more."""
        base, extra = divmod(self.total, self.micros)
        return tuple(base + (m < extra) for m in range(self.micros))

    def rows_of_member(self, member: int) -> range:
        """The rows of the whole batch that pipe rank ``member`` brought (and gets back)."""
        if not 0 <= member < self.members:
            raise ValueError(f"pipe rank ({member}) must be in [0, {self.members})")
        return range(member * self.local, (member + 1) * self.local)
