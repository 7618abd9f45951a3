"""Crash-safe writes: data goes to a temporary name in the same directory and is renamed into
place only once it is on disk, so a reader sees the old checkpoint or the new one, never half."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from typing import BinaryIO

__all__ = ["atomic_write", "describe", "fsync_dir", "replace_dir", "temp_path_prefix"]


def describe(error: BaseException | None) -> str | None:
    """What a rank tells the others about its failure (``str`` of an OSError names the file)."""
    return None if error is None else f"{type(error).__name__}: {error}"


def temp_path_prefix(path: str) -> str:
    """Temporaries of ``path`` start with this (hidden, next to the target): tests and cleaners find them."""
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-")


def fsync_dir(directory: str) -> None:
    """Persist a rename or a new entry in ``directory`` (no-op where directories can't be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], write: Callable[[BinaryIO], None]) -> None:
    """``write(f)`` into a temporary file next to ``path``; flush, fsync, rename over ``path``, fsync
    the directory. If ``write`` raises, the temporary is removed and ``path`` is untouched."""
    target = os.path.abspath(os.fspath(path))
    directory = os.path.dirname(target)
    prefix = os.path.basename(temp_path_prefix(target))
    fd, tmp = tempfile.mkstemp(prefix=prefix, dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(directory)


def replace_dir(tmp_dir: str, final_dir: str) -> None:
    """Move the finished ``tmp_dir`` to ``final_dir`` (same parent), replacing an older one.

    A non-empty directory can't be renamed over another, so an existing ``final_dir`` is first
    renamed aside and deleted after the swap: a crash in between leaves no directory under the
    final name (the old one survives as ``.<name>.old-*``), never a partial one.
    """
    parent = os.path.dirname(final_dir)
    fsync_dir(tmp_dir)
    if os.path.exists(final_dir):
        old = os.path.join(parent, f".{os.path.basename(final_dir)}.old-{uuid.uuid4().hex}")
        os.rename(final_dir, old)
        os.rename(tmp_dir, final_dir)
        fsync_dir(parent)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp_dir, final_dir)
    fsync_dir(parent)
