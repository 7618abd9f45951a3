"""The files of a training checkpoint: names, durable writes with checksums, verification.

Layout of one checkpoint directory (``<root>/<tag>/``)::

    manifest.json                        written last: what a complete checkpoint holds
    model/                               bmt_zero.store.save_sharded (sharded=True), or
    model.pt                             bmt.save (sharded=False)
    optim-00000-of-00002.pt              rank 0's optimizer / OptimManager / scheduler states
    meta-00000-of-00002.pt               rank 0's RNG states, topology and optimizer shard layout
    extra-00000-of-00002.pt              rank 0's ``extra`` (pickled user objects)
    ...

Every non-model file is listed in the manifest with its size and SHA-256; model files with their
size (their contents are checked by the store functions that read them).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "FORMAT",
    "LATEST_FILE",
    "MANIFEST_FILE",
    "VERSION",
    "FileRecord",
    "rank_file",
    "read_manifest",
    "save_object",
    "sha256_of",
    "verify",
]

FORMAT = "bmtrain-training-checkpoint"
VERSION = 1
MANIFEST_FILE = "manifest.json"
LATEST_FILE = "latest"  # one line: the tag of the newest complete checkpoint under the root
_CHUNK = 1 << 23  # bytes per read while hashing


def rank_file(kind: str, rank: int, world_size: int) -> str:
    """``optim-00001-of-00004.pt``: rank ``rank``'s file of ``kind`` (optim, meta, extra)."""
    return f"{kind}-{rank:05d}-of-{world_size:05d}.pt"


@dataclass(frozen=True)
class FileRecord:
    """A written file as the manifest lists it (``sha256`` None: checked by its reader)."""

    name: str  # relative to the checkpoint directory, "/"-separated
    size: int
    sha256: str | None

    def to_json(self) -> dict[str, Any]:
        return {"size": self.size, "sha256": self.sha256}


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def save_object(path: str, obj: Any) -> None:
    """``torch.save(obj)`` into a new file at ``path``, flushed and fsynced."""
    with open(path, "xb") as f:  # x: a leftover from an earlier try is an error, not overwritten
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def write_file(directory: str, name: str, obj: Any) -> FileRecord:
    """Write ``obj`` durably as ``directory/name``; its size and checksum as read back from disk."""
    path = os.path.join(directory, name)
    save_object(path, obj)
    return FileRecord(name, os.path.getsize(path), sha256_of(path))


def verify(directory: str, name: str, manifest: dict[str, Any]) -> str | None:
    """Why ``directory/name`` differs from what the manifest lists, or None when it matches."""
    entry = manifest["files"].get(name)
    if entry is None:
        return f"{name} is not listed in the manifest"
    path = os.path.join(directory, name)
    try:
        size = os.path.getsize(path)
    except OSError as ex:
        return f"missing file {name} ({type(ex).__name__}: {ex.strerror or ex})"
    if size != entry["size"]:
        return f"{name} has {size} bytes, the manifest lists {entry['size']} (truncated or replaced?)"
    if entry.get("sha256") is not None:
        digest = sha256_of(path)
        if digest != entry["sha256"]:
            return f"{name} has SHA-256 {digest[:16]}..., the manifest lists {entry['sha256'][:16]}... (corrupted)"
    return None


def read_manifest(directory: str) -> dict[str, Any]:
    """The manifest of the checkpoint in ``directory``; ValueError/OSError naming what is wrong."""
    path = os.path.join(directory, MANIFEST_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} does not exist: {directory} is not a complete training checkpoint "
            f"(an interrupted save leaves no manifest)"
        )
    with open(path, encoding="utf-8") as f:
        try:
            manifest: dict[str, Any] = json.load(f)
        except json.JSONDecodeError as ex:
            raise ValueError(f"{path} is not valid JSON ({ex}): an incomplete or damaged manifest") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ValueError(
            f"{path} is not a {FORMAT} v{VERSION} manifest "
            f"(format={manifest.get('format')!r}, version={manifest.get('version')!r})"
        )
    for key in ("step", "world_size", "tp_size", "pipe_size", "files", "model"):
        if key not in manifest:
            raise ValueError(f"{path} lacks {key!r}: an incomplete manifest")
    return manifest
