"""Crash-safe writes: data goes to a temporary name in the same directory and is renamed into
place only once it is on disk, so a reader sees the old checkpoint or the new one, never half."""

from __future__ import annotations

import os
import secrets
import shutil
import uuid
from collections.abc import Callable
from typing import BinaryIO

__all__ = ["atomic_write", "describe", "follow_umask", "fsync_dir", "replace_dir", "temp_path_prefix"]


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
    fd, tmp = _create_temp(directory, prefix)
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


def _umask() -> int:
    """The process umask, read without changing it (``os.umask`` can only be read by setting it,
    a race with a background save): /proc on Linux, else a set-and-restore."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: str) -> None:
    """Give a file a writer made with 0600 (safetensors does) the mode ``open()`` would have."""
    os.chmod(path, 0o666 & ~_umask())


def _create_temp(directory: str, prefix: str) -> tuple[int, str]:
    """A new file opened for writing, mode ``0o666 & ~umask`` as ``open()`` makes it: mkstemp's
    0600 would make every checkpoint unreadable to the group whatever the user's umask says."""
    for _ in range(100):
        tmp = os.path.join(directory, prefix + secrets.token_hex(8))
        try:
            # O_EXCL: a fresh name of our own, as mkstemp; the kernel applies the umask to 0o666
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name {prefix}* in {directory} after 100 tries")


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
