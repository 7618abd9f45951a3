"""A Block's phase through one training step, the context's scheduler, and wrong transitions.

Each layer records, while it runs, its Block's phase and what the scheduler has prefetched; the
step's outputs and gradients are compared with plain torch (fp32, rtol=atol=1e-5: only the
summation order differs).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from .models import distribute_, holds_no_gather, plain_copy, rows

DIM, LAYERS = 8, 3
RTOL = ATOL = 1e-5


class _Recorder(nn.Module):
    """``x + tanh(fc(x))``; appends ``(index, phase name, prefetched index)`` to ``log`` when it
    runs, and ``(index, "grad", phase name)`` when the gradient of its output reaches it."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index
        self.fc = nn.Linear(DIM, DIM)
        self.log: list[tuple[Any, ...]] = []
        self.blocks: list[Any] = []  # every Block of the list, set after the build (not children)

    def _prefetched(self) -> int | None:
        scheduler = self.blocks[self.index].runtime.scheduler
        for block in self.blocks:
            if scheduler.prefetched is not None and block.runtime.shared is scheduler.prefetched:
                return int(block._module.index)
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x + torch.tanh(self.fc(x))
        if not self.blocks:  # the plain torch reference
            return y
        runtime = self.blocks[self.index].runtime
        self.log.append((self.index, runtime.phase.name, self._prefetched()))
        if y.requires_grad:
            y.register_hook(lambda g: self.log.append((self.index, "grad", runtime.phase.name)) or g)
        return y


def _phases_through_a_step(use_checkpoint: bool) -> None:
    import bmt_comm
    from bmt_ckpt import Block, TransformerBlockList
    from bmt_ckpt.block.runtime import BlockPhase
    from bmt_ckpt.block.scheduler import BlockScheduler

    ctx = bmt_comm.get_context()
    torch.manual_seed(3)
    layers = [_Recorder(i) for i in range(LAYERS)]
    ref = plain_copy(nn.Sequential(*layers))
    model = TransformerBlockList([Block(distribute_(m), use_checkpoint=use_checkpoint) for m in layers])
    log: list[tuple[Any, ...]] = []
    for m in layers:
        m.blocks, m.log = list(model), log
    scheduler = BlockScheduler.current()
    assert all(b.runtime.scheduler is scheduler for b in model), "one scheduler per context, shared by every Block"

    x = torch.randn(2 * ctx.world_size, 4, DIM, generator=torch.Generator().manual_seed(5))
    mine = rows(x, ctx.rank, ctx.world_size).requires_grad_()
    out = model(mine)
    # over a group of one nothing is gathered, so nothing is prefetched either (in place)
    sharded = not model[0].storage.in_place
    forward_log = [(i, "FORWARD", i + 1 if sharded and i + 1 < LAYERS else None) for i in range(LAYERS)]
    assert log == forward_log, f"forward: {log}"  # each layer runs with the next one prefetched
    assert all(b.runtime.phase is BlockPhase.IDLE for b in model)
    assert scheduler.prefetched is None  # the last layer prefetches nothing, and took its own
    log.clear()
    out.square().sum().backward()

    want: list[tuple[Any, ...]] = []
    for i in reversed(range(LAYERS)):
        if use_checkpoint:
            want.append((i, "RECOMPUTE", i - 1 if sharded and i else None))  # the previous layer is prefetched
        want.append((i, "grad", "BACKWARD"))
    assert log == want, f"backward: {log}"
    assert all(b.runtime.phase is BlockPhase.IDLE and holds_no_gather(b.storage) for b in model)
    # the final callback ran: no prefetch left, every reduce-scatter waited for, ready for the next pass
    assert scheduler.prefetched is None and scheduler.reducing == [] and not scheduler.final_queued

    xr = x.clone().requires_grad_()
    want_out = ref(xr)
    want_out.square().sum().backward()
    torch.testing.assert_close(out, rows(want_out, ctx.rank, ctx.world_size), rtol=RTOL, atol=ATOL)
    assert xr.grad is not None and mine.grad is not None
    torch.testing.assert_close(mine.grad, rows(xr.grad, ctx.rank, ctx.world_size), rtol=RTOL, atol=ATOL)
    with torch.no_grad():  # one step of p -= grad on both sides: the gathered parameters agree
        for p in [*model.parameters(), *ref.parameters()]:
            assert p.grad is not None
            p.sub_(p.grad)
    got, expected = model.state_dict(), ref.state_dict()
    assert list(got) == list(expected)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("use_checkpoint", [True, False])
def test_phases_through_a_step(spawn, world_size, use_checkpoint):
    spawn(_phases_through_a_step, use_checkpoint)


class _Reentrant(nn.Module):
    """``fc(x)``; the first call runs ``again[0](x)`` inside it (a Block running inside itself)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(DIM, DIM)
        self.again: list[Any] = []
        self.inside = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.again and not self.inside:
            self.inside = True
            try:
                self.again[0](x)
            finally:
                self.inside = False
        return self.fc(x)


def _wrong_transitions_raise() -> None:
    from bmt_ckpt import Block
    from bmt_ckpt.block.runtime import BlockPhase

    torch.manual_seed(4)
    inner = _Reentrant()
    ref = plain_copy(inner)
    block = Block(distribute_(inner))
    twin = Block(inner, initialized=True)
    twin.reference(block)  # shares block's storage
    x = torch.randn(2, DIM, generator=torch.Generator().manual_seed(6))
    for again, match in (
        (block, r"a Block's phase cannot go from FORWARD to FORWARD \(only from IDLE\)"),
        (twin, r"bound full by another Block sharing its storage \(in FORWARD\)"),
    ):
        inner.again = [again]
        for grad in (True, False):
            with torch.set_grad_enabled(grad), pytest.raises(RuntimeError, match=match):
                block(x)
            for b in (block, twin):  # the error left both Blocks idle and usable
                assert b.runtime.phase is BlockPhase.IDLE and b.runtime.shared.user is None
    inner.again = []
    y = block(x)
    torch.testing.assert_close(y, ref(x), rtol=RTOL, atol=ATOL)
    y.sum().backward()

    runtime = block.runtime
    with pytest.raises(RuntimeError, match=r"from IDLE to IDLE \(only from FORWARD or RECOMPUTE or BACKWARD\)"):
        runtime.finish()
    with pytest.raises(RuntimeError, match=r"from IDLE to BACKWARD \(only from RECOMPUTE\)"):
        runtime.advance(BlockPhase.BACKWARD)
    with pytest.raises(RuntimeError, match=r"bind\(\) needs an acquired Block .* it is IDLE"):
        runtime.bind()
    with pytest.raises(ValueError, match="acquire\\(\\) starts a phase: FORWARD, RECOMPUTE or BACKWARD, not IDLE"):
        runtime.acquire(BlockPhase.IDLE)
    runtime.acquire(BlockPhase.FORWARD)
    with pytest.raises(RuntimeError, match=r"from FORWARD to BACKWARD \(only from RECOMPUTE\)"):
        runtime.advance(BlockPhase.BACKWARD)
    runtime.finish()
    assert runtime.phase is BlockPhase.IDLE


def test_wrong_transitions_raise(spawn):
    spawn(_wrong_transitions_raise)
