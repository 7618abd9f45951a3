"""Checkpoint failures that every rank raises alike, and write failures that say what happened."""

from __future__ import annotations

import errno
import os

import bmt_comm
from bmt_comm import Communicator

__all__ = ["CheckpointError", "Status", "agree", "raise_agreed", "status_of", "text_of", "write_failure"]


class CheckpointError(RuntimeError):
    """A checkpoint that can't be loaded (truncated, corrupt, incomplete, another model's).

    Raised with the same message on every rank, before any parameter of the model was written.
    """


def text_of(error: BaseException) -> str:
    """What a rank tells the others about its failure."""
    if isinstance(error, CheckpointError):
        return str(error)
    return f"{type(error).__name__}: {error}"


Status = tuple[str, "int | None"] | None  # a rank's failure: its text and errno, or None


def status_of(error: BaseException | None) -> Status:
    """What one rank contributes to :func:`agree` (or to an all-gather of its own)."""
    if error is None:
        return None
    return text_of(error), error.errno if isinstance(error, OSError) else None


def raise_agreed(statuses: list[Status], comm: Communicator, what: str, own: BaseException | None = None) -> None:
    """Every rank's ``status_of``, gathered: raise the same exception on every rank if any failed.

    An ``OSError`` with the first failing rank's errno where that rank's error was one (a full
    disk stays ``ENOSPC`` everywhere), else a :class:`CheckpointError`; the message names the ranks.
    """
    failed = [(comm.global_ranks[r], s) for r, s in enumerate(statuses) if s is not None]
    if not failed:
        return
    by_text: dict[str, list[int]] = {}
    for rank, (text, _) in failed:
        by_text.setdefault(text, []).append(rank)
    parts = [f"{text} (on rank{'s' if len(rs) > 1 else ''} {', '.join(map(str, rs))})" for text, rs in by_text.items()]
    message = f"{what} failed: " + "; ".join(parts)
    code = failed[0][1][1]
    if code is not None:
        raise OSError(code, message) from own
    raise CheckpointError(message) from own


def agree(error: BaseException | None, comm: Communicator, what: str) -> None:
    """Collective (one all-gather of a short status per rank): if any rank failed, every rank
    raises the same exception with the same message (``raise_agreed``), so that a program which
    catches it and goes on (an older checkpoint) keeps its ranks in step."""
    raise_agreed(bmt_comm.allgather_objects(status_of(error), comm), comm, what, error)


def _os_error(error: BaseException) -> OSError | None:
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError) and current.errno is not None:
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def write_failure(path: str, error: BaseException, seen: OSError | None, written: int,
                  previous: str | None = None) -> BaseException:
    """The error to raise for a failed write of ``path``: an ``OSError`` naming the path, the
    cause (``ENOSPC``: no space left on device) and what is left on disk, where one is known
    (``seen``: the one the file object raised, even if torch turned it into another error).
    ``previous``: the checkpoint this write would have replaced (default ``path``)."""
    cause = seen or _os_error(error)
    if cause is None or cause.errno is None:
        return error
    previous = path if previous is None else previous
    left = (f"the previous checkpoint at {previous!r} is intact" if os.path.exists(previous)
            else f"no checkpoint was written at {previous!r}")
    if cause.errno in (errno.ENOSPC, errno.EDQUOT):
        what = "no space left on device" if cause.errno == errno.ENOSPC else "disk quota exceeded"
    else:
        what = cause.strerror or str(cause)
    return OSError(cause.errno, f"{what} while writing {path!r} ({written} bytes written); {left}")
