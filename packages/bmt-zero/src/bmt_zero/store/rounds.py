"""The rounds of a lazy load (``bmt.load``): before each transfer, every rank says what it wants.

The checkpoint lives on one rank and moves one tensor at a time. Each transfer starts with a
round: an all-gather of one small row per rank (what it asks for; for a shard, which piece).
Ranks that hold the part of the model being loaded ask for it; ranks that hold none of it (the
layers of another pipeline stage) *follow*: they ask for nothing, receive nothing, and keep
taking part until the holders say they are done. Every rank sees every row, so all agree on the
transfer that follows, and a disagreement is raised on every rank instead of hanging.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import astuple, dataclass
from enum import IntEnum

import torch
from bmt_comm import Communicator

__all__ = ["Op", "Ask", "exchange", "agreed"]


class Op(IntEnum):
    """What a rank asks of the source in one round."""

    IDLE = 0  # following: the part being loaded is held by other ranks
    DONE = 1  # the holders of the part being loaded have finished it
    SHARD = 2  # this rank's piece of a tensor (``load_shard``)
    FULL = 3  # a whole tensor (``wrapper[key]``)
    OBJECT = 4  # a non-tensor value (``wrapper[key]``, e.g. extra state)


@dataclass(frozen=True)
class Ask:
    """One rank's row of a round. ``key`` indexes the checkpoint's entries; for a SHARD, the piece
    is ``[start, end)`` of the flattened tensor-parallel slice ``tp_rank`` (``split_size`` wide
    along ``split_dim``; ``split_dim`` -1: the whole tensor)."""

    op: Op
    key: int = -1
    tp_rank: int = 0
    split_dim: int = -1
    split_size: int = 0
    start: int = 0
    end: int = 0

    def row(self) -> list[int]:
        return [int(v) for v in astuple(self)]

    @classmethod
    def from_row(cls, row: Sequence[int]) -> Ask:
        return cls(Op(row[0]), *row[1:])

    def tp_slice(self, full: torch.Tensor) -> torch.Tensor:
        """The flattened tensor-parallel slice of the checkpoint tensor that ``[start, end)`` indexes."""
        if self.split_dim < 0:
            return full.reshape(-1)
        return full.narrow(self.split_dim, self.tp_rank * self.split_size, self.split_size).reshape(-1)


_ROW = len(Ask(Op.IDLE).row())


def exchange(ask: Ask, comm: Communicator) -> list[Ask]:
    """Collective: every rank's ask, in group-rank order."""
    mine = torch.tensor(ask.row(), dtype=torch.int64, device=comm.device)
    rows = torch.empty(_ROW * comm.size, dtype=torch.int64, device=comm.device)
    comm.all_gather(mine, rows)
    flat = rows.tolist()
    return [Ask.from_row(flat[r * _ROW : (r + 1) * _ROW]) for r in range(comm.size)]


def agreed(asks: Sequence[Ask], names: Sequence[str], ranks: Sequence[int]) -> tuple[Op, int]:
    """The one (op, key) that every asking rank asked for; raised identically on every rank if
    they differ or nobody asks (a part of the model that no rank holds)."""
    wanted = {(a.op, a.key) for a in asks if a.op is not Op.IDLE}
    if len(wanted) == 1:
        return wanted.pop()

    def name(a: Ask) -> str:
        return a.op.name if a.key < 0 else f"{a.op.name} {names[a.key]!r}"

    if not wanted:
        raise RuntimeError(
            "bmt.load: every rank is waiting for another to load a part of the model that no rank "
            "holds (a module's children listed by _bmt_children_everywhere must each be held somewhere)"
        )
    said = ", ".join(f"rank {ranks[r]}: {name(a)}" for r, a in enumerate(asks) if a.op is not Op.IDLE)
    raise RuntimeError(
        f"bmt.load: the ranks must load the same checkpoint entries in the same order, but they asked for {said}"
    )
