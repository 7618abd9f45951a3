"""Collective timeouts: one deadline for every group bmt makes, and errors that name the operation.

``init_distributed(timeout=...)`` (or ``BMT_TIMEOUT`` seconds) sets it; torch's 30 minutes
otherwise. A collective that fails (timed out, or a peer's connection closed) is re-raised as
:class:`CollectiveError`, naming the operation, the group and, where the store can tell, the
members that never reported the same failure (the dead or stuck ones).
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import time
from collections.abc import Iterator, Sequence
from typing import Any

__all__ = [
    "DEFAULT_TIMEOUT",
    "ENV_VAR",
    "CollectiveError",
    "FailureReport",
    "describe_failure",
    "guard",
    "resolve_timeout",
]

ENV_VAR = "BMT_TIMEOUT"
DEFAULT_TIMEOUT = datetime.timedelta(seconds=1800)  # torch's and 1.0.1's
_REPORT_PREFIX = "bmt_failed"


def resolve_timeout(value: Any, environ: dict[str, str] | None = None) -> datetime.timedelta:
    """``value`` (seconds or a timedelta), else ``BMT_TIMEOUT`` seconds, else 1800 s."""
    env = os.environ if environ is None else environ
    if value is None:
        raw = env.get(ENV_VAR, "").strip()
        if not raw:
            return DEFAULT_TIMEOUT
        try:
            seconds = float(raw)
        except ValueError:
            raise ValueError(f"environment variable {ENV_VAR} must be a number of seconds, got {raw!r}") from None
        if not math.isfinite(seconds) or seconds <= 0:
            raise ValueError(f"environment variable {ENV_VAR} must be a positive number of seconds, got {raw!r}")
        return datetime.timedelta(seconds=seconds)
    if isinstance(value, datetime.timedelta):
        if value.total_seconds() <= 0:
            raise ValueError(f"init_distributed(timeout=...) must be positive, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            "init_distributed(timeout=...) must be seconds (an int or float) or a datetime.timedelta, "
            f"got {type(value).__name__} {value!r}"
        )
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"init_distributed(timeout=...) must be a positive number of seconds, got {value!r}")
    return datetime.timedelta(seconds=float(value))


class CollectiveError(RuntimeError):
    """A collective that did not complete on this rank: timed out, or a peer went away."""

    def __init__(
        self,
        op: str,
        ranks: Sequence[int],
        timeout: datetime.timedelta | None,
        cause: str,
        missing: Sequence[int] | None = None,
        label: str = "",
    ) -> None:
        self.op = op
        self.ranks = tuple(ranks)
        self.timeout = timeout
        self.cause = cause
        self.missing = None if missing is None else tuple(missing)
        self.label = label
        super().__init__(describe_failure(op, self.ranks, timeout, cause, self.missing, label))

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across processes
        return CollectiveError, (self.op, self.ranks, self.timeout, self.cause, self.missing, self.label)


def describe_failure(
    op: str,
    ranks: Sequence[int],
    timeout: datetime.timedelta | None,
    cause: str,
    missing: Sequence[int] | None,
    label: str = "",
) -> str:
    group = f"group {label} (global ranks {list(ranks)})" if label else f"group of global ranks {list(ranks)}"
    limit = f"{timeout.total_seconds():g}s" if timeout is not None else "the default group's timeout"
    text = f"{op} on {group} did not complete (timeout {limit}): {cause.strip()}"
    if missing:
        text += f"; ranks that did not arrive or report this failure: {list(missing)}"
    elif missing is not None:
        text += "; every member reported this failure (the cause is on the network or a later rank)"
    return text


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:500]


class FailureReport:
    """Who else saw the failure of collective number ``seq``: a key per member in the store.

    Members that failed too write their key within ``grace`` seconds; the ones absent are dead,
    stuck before the collective, or still waiting on someone else (reported as "did not arrive").
    """

    def __init__(self, store: Any, ranks: Sequence[int], seq: int, generation: str = "") -> None:
        self._store = store
        self._ranks = tuple(ranks)
        self._base = f"{_REPORT_PREFIX}/{generation}/{'-'.join(map(str, self._ranks))}/{seq}"

    def key(self, rank: int) -> str:
        return f"{self._base}/{rank}"

    def missing(self, me: int, grace: float, clock: Any = time.monotonic, sleep: Any = time.sleep) -> list[int] | None:
        """Publish this rank's failure, wait up to ``grace`` s for the others'; None if the store fails."""
        try:
            self._store.set(self.key(me), b"1")
            deadline = clock() + grace
            absent = [r for r in self._ranks if r != me]
            while absent:
                absent = [r for r in absent if not self._store.check([self.key(r)])]
                if not absent or clock() >= deadline:
                    break
                sleep(0.1)
            return absent
        except Exception:  # the store lives on a dead rank, or has timed out itself: say nothing
            return None


def report_grace(timeout: datetime.timedelta | None) -> float:
    """How long a failing rank waits to hear from the others: enough for the ones that time out
    a moment later, at most 5 s (the whole error then comes within timeout + 5 s)."""
    if timeout is None:
        return 2.0
    return max(0.5, min(5.0, timeout.total_seconds() / 2))


@contextlib.contextmanager
def guard(
    op: str,
    ranks: Sequence[int],
    my_rank: int,
    timeout: datetime.timedelta | None,
    store: Any = None,
    seq: int | None = None,
    label: str = "",
    generation: str = "",
) -> Iterator[None]:
    """Turn a transport's failure inside the block into a :class:`CollectiveError`."""
    try:
        yield
    except CollectiveError:
        raise
    except RuntimeError as exc:  # torch's DistBackendError/DistError are RuntimeErrors
        missing: list[int] | None = None
        if store is not None and seq is not None:
            missing = FailureReport(store, ranks, seq, generation).missing(my_rank, report_grace(timeout))
        raise CollectiveError(op, ranks, timeout, _first_line(exc), missing, label) from exc
