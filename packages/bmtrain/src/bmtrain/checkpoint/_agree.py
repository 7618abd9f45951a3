"""Every rank raises the same error, or none does: one small object all-gather per decision."""

from __future__ import annotations

from collections.abc import Callable

import bmt_comm

__all__ = ["CheckpointError", "agree", "describe", "settle"]

_SHOWN = 4  # ranks' messages quoted in one error; the rest are counted


class CheckpointError(RuntimeError):
    """A training checkpoint could not be saved or loaded; raised alike on every rank."""


def describe(error: BaseException | None) -> str | None:
    return None if error is None else f"{type(error).__name__}: {error}"


def agree(own: str | None, what: str, cleanup: Callable[[], None] | None = None) -> None:
    """All-gather each rank's problem (``None``: fine); raise ``CheckpointError`` on every rank,
    with the same message, if any rank has one (after ``cleanup()``, when given)."""
    everyone: list[str | None] = bmt_comm.allgather_objects(own, bmt_comm.get_context().comms.world)
    settle(everyone, what, cleanup)


def settle(everyone: list[str | None], what: str, cleanup: Callable[[], None] | None = None) -> None:
    """``agree`` once every rank's problem is known (the same list on every rank)."""
    bad = [(r, m) for r, m in enumerate(everyone) if m is not None]
    if not bad:
        return
    if cleanup is not None:
        cleanup()
    if len({m for _, m in bad}) == 1 and len(bad) > 1:  # the same on several ranks: say it once
        ranks = ", ".join(str(r) for r, _ in bad)
        raise CheckpointError(f"{what}: on ranks {ranks}: {bad[0][1]}")
    parts = [f"rank {r}: {m}" for r, m in bad[:_SHOWN]]
    more = f"; and {len(bad) - _SHOWN} more ranks" if len(bad) > _SHOWN else ""
    raise CheckpointError(f"{what}: " + "; ".join(parts) + more)
