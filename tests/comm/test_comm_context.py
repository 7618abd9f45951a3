"""``DistContext.slot``: one object of a class per ``init_distributed``, for other packages' state."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest


@dataclass
class _Counter:
    seen: list[int] = field(default_factory=list)


def _slots_live_with_the_context() -> None:
    import bmt_comm

    ctx = bmt_comm.get_context()
    first = ctx.slot(_Counter)
    first.seen.append(ctx.rank)
    assert ctx.slot(_Counter) is first and first.seen == [ctx.rank]  # one per context, kept
    assert bmt_comm.get_context().slot(_Counter) is first
    ctx.slots[_Counter] = "not a counter"
    with pytest.raises(TypeError, match="context slot _Counter holds a str"):
        ctx.slot(_Counter)
    ctx.slots[_Counter] = first
    bmt_comm.destroy()
    bmt_comm.init_distributed()
    again = bmt_comm.get_context().slot(_Counter)
    assert again is not first and again.seen == []  # a new context starts with a new one
    bmt_comm.destroy()


@pytest.mark.parametrize("world_size", [1, 2])
def test_context_slot_per_init(spawn, world_size):
    spawn(_slots_live_with_the_context)
