"""Updates started before the step is known to go ahead (``AdamOffloadOptimizer(speculative_fraction=f)``).

After a checked backward (a guarded, scaled or clipped ``update_during_backward``) an update may
start only at the step: only then is every rank's gradient known to be finite and the clip
factor known, so the CPU waits for the whole backward. With ``speculative_fraction=f`` the
updates of the Blocks whose gradients arrive first (the last layers) start at once anyway, up to
the fraction ``f`` of the offloaded elements, once their fp32 master and moments are copied to a
host backup. At the step each such update is kept if it used what the step uses (the same
scale, learning rate and step number, an unchanged gradient); otherwise (a skipped step, a clip
that scales the gradients, a gradient edited after its Block's backward, a new learning rate) its
backup is copied back and it is updated with the rest, from the same host gradient (a
speculative update writes its new values to a buffer of its own, not over the gradient). Kept or
redone, the result is the default step's bit for bit.

Costs 14 bytes of host memory per element of the fraction (the backup, 12, and the new values'
page-locked buffer, 2; allocated at the first checked backward) and, during the backward, a copy
of that state before its update.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Any

import torch

from ._host_arena import HostArena
from ._host_update import Landing
from .kernels_adam import AdamScalars

__all__ = ["BackupPool", "Saved", "Speculation", "SpeculationStats"]


class BackupPool:
    """Host memory for the fp32 state (master, moments) of up to ``capacity`` elements, and for
    their new 16-bit values (page-locked with ``pin``: they are copied to the device)."""

    def __init__(self, capacity: int, pin: bool) -> None:
        self.capacity = capacity
        self._pin = pin
        self._buf: torch.Tensor | None = None  # allocated at the first use: a step may never speculate
        self._outs: HostArena | None = None
        self._used = 0

    @property
    def left(self) -> int:
        return self.capacity - self._used

    def reset(self) -> None:
        """A new backward: the backups of the last one are no longer needed."""
        self._used = 0

    def take(self, numel: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A ``(3, numel)`` fp32 backup and a 1-D ``dtype`` (16-bit) output buffer, or None when
        fewer than ``numel`` elements are left."""
        if numel > self.left:
            return None
        if self._buf is None or self._outs is None:
            self._buf = torch.empty(3 * self.capacity, dtype=torch.float32)
            self._outs = HostArena([(2 * self.capacity, torch.uint8)], self._pin)
        backup = self._buf[3 * self._used : 3 * (self._used + numel)].view(3, numel)
        out = self._outs.view(0)[2 * self._used : 2 * (self._used + numel)].view(dtype)
        self._used += numel
        return backup, out

    def close(self) -> None:
        if self._outs is not None:
            self._outs.close()


@dataclass
class Saved:
    """One parameter whose update started during the backward, and what undoes it."""

    param: torch.Tensor
    step: int  # its state's step count before this update
    new: bool  # its state was created for this update (undo: drop it)
    backup: torch.Tensor  # (3, numel): master, exp_avg, exp_avg_sq before the update (unused when new)
    scalars: AdamScalars  # what the update used
    delta: torch.Tensor | None  # its record_delta sums


@dataclass
class Speculation:
    """The parameters of one gradient-ready hook, updated before the step's decision."""

    landing: Landing
    saved: list[Saved]
    backed_up: bool = False  # set on the feeder thread once every backup is taken (then the update starts)


@dataclass
class SpeculationStats:
    """Elements (this rank) whose update started during a checked backward, kept at the step, and
    undone (a skipped step, another scale or learning rate, an edited gradient); cumulative."""

    started: int = 0
    kept: int = 0
    undone: int = 0


def back_up(spec: Speculation, state: MutableMapping[torch.Tensor, dict[str, Any]]) -> None:
    """Copy the state of ``spec``'s parameters to their backups (on the feeder thread, before the
    update is queued)."""
    for s in spec.saved:
        if not s.new:
            st = state[s.param]
            for row, key in enumerate(("_param_fp32", "exp_avg", "exp_avg_sq")):
                s.backup[row].copy_(st[key])
    spec.backed_up = True


def restore(spec: Speculation, state: MutableMapping[torch.Tensor, dict[str, Any]]) -> None:
    """Undo ``spec``'s updates (each has finished or failed): the state as before them."""
    for s in spec.saved:
        if s.new:
            state.pop(s.param, None)
            continue
        st = state[s.param]
        st["step"] = s.step
        if spec.backed_up:
            for row, key in enumerate(("_param_fp32", "exp_avg", "exp_avg_sq")):
                st[key].copy_(s.backup[row])
