"""Updates started before the step is known to go ahead (``AdamOffloadOptimizer(speculative_fraction=f)``).

After a checked backward (a guarded, scaled or clipped ``update_during_backward``) an update may
start only at the step: only then is every rank's gradient known to be finite and the clip
factor known, so the CPU waits for the whole backward. With ``speculative_fraction=f`` the
updates of the Blocks whose gradients arrive first (the last layers) start at once anyway, up to
the fraction ``f`` of the offloaded elements, out of place: the C++ kernel reads the fp32 master
and moments and writes the new ones to spare buffers, and the new 16-bit values to a buffer of
their own (not over the host gradient). At the step each such update is kept if it used what
the step uses (the same scale, learning rate and step number, an unchanged gradient): its spare
buffers become the state, and the old state the spares of the next step. Otherwise (a skipped
step, a clip that scales the gradients, a gradient edited after its Block's backward, a state
dict taken before the step) it is dropped, the state untouched, and the parameter is updated
with the rest from the same host gradient. Kept or dropped, the result is the default step's,
bit for bit, and the CPU moves no more bytes than the update itself.

Costs 14 bytes of host memory per element of the fraction (12 for the spare state, 2 page-locked
for the new values), allocated for each parameter the first time its update is speculative.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Any

import torch

from ._host_arena import HostArena
from ._host_update import Landing
from .kernels_adam import AdamScalars

__all__ = ["STATE_KEYS", "Saved", "Spare", "SparePool", "Speculation", "SpeculationStats", "keep", "undo"]

STATE_KEYS = ("_param_fp32", "exp_avg", "exp_avg_sq")
Spare = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # a new master, exp_avg, exp_avg_sq


class SparePool:
    """Spare fp32 state and 16-bit output buffers for up to ``capacity`` elements, per parameter
    (the same parameters speculate every step: the Blocks that arrive first)."""

    def __init__(self, capacity: int, pin: bool) -> None:
        self.capacity = capacity
        self._pin = pin
        self._outs: HostArena | None = None  # page-locked: the new values are copied to the device
        self._used = 0
        self._by_param: dict[int, tuple[torch.Tensor, Spare, torch.Tensor]] = {}  # id(p) -> (p, spare, out)

    def take(self, p: torch.Tensor) -> tuple[Spare, torch.Tensor] | None:
        """``p``'s spare state and output buffer, or None when the pool has no room for it."""
        got = self._by_param.get(id(p))
        if got is not None and got[0] is p:
            return got[1], got[2]
        n = p.numel()
        if n > self.capacity - self._used:
            return None
        if self._outs is None:
            self._outs = HostArena([(2 * self.capacity, torch.uint8)], self._pin)
        out = self._outs.view(0)[2 * self._used : 2 * (self._used + n)].view(p.dtype)
        self._used += n
        spare = (torch.empty(n, dtype=torch.float32), torch.empty(n, dtype=torch.float32),
                 torch.empty(n, dtype=torch.float32))
        self._by_param[id(p)] = (p, spare, out)
        return spare, out

    def give_back(self, p: torch.Tensor, spare: Spare) -> None:
        """``spare`` (the state ``p`` had before a kept update) is ``p``'s spare from now on."""
        _, _, out = self._by_param[id(p)]
        self._by_param[id(p)] = (p, spare, out)

    def close(self) -> None:
        if self._outs is not None:
            self._outs.close()


@dataclass
class Saved:
    """One parameter whose update started during the backward."""

    param: torch.Tensor
    step: int  # its state's step count before this update
    new: bool  # its state was created for this update (dropped: the state goes)
    spare: Spare  # where the update writes the new master and moments
    scalars: AdamScalars  # what the update used
    delta: torch.Tensor | None  # its record_delta sums


@dataclass
class Speculation:
    """The parameters of one gradient-ready hook, updated before the step's decision."""

    landing: Landing
    saved: list[Saved]


@dataclass
class SpeculationStats:
    """Elements (this rank) whose update started during a checked backward, kept at the step, and
    dropped (a skipped step, another scale or learning rate, an edited gradient); cumulative."""

    started: int = 0
    kept: int = 0
    undone: int = 0


def keep(spec: Speculation, state: MutableMapping[torch.Tensor, dict[str, Any]], pool: SparePool) -> None:
    """The update stands: its new master and moments become the state (the old ones, the spares)."""
    for s in spec.saved:
        st = state[s.param]
        old = (st[STATE_KEYS[0]], st[STATE_KEYS[1]], st[STATE_KEYS[2]])
        for key, t in zip(STATE_KEYS, s.spare, strict=True):
            st[key] = t
        pool.give_back(s.param, old)


def undo(spec: Speculation, state: MutableMapping[torch.Tensor, dict[str, Any]]) -> None:
    """The update is dropped (its chunks have finished or failed): only the step count it took back."""
    for s in spec.saved:
        if s.new:
            state.pop(s.param, None)
        else:
            state[s.param]["step"] = s.step
