"""Checking checkpoint files before anything is loaded from them: sizes, then checksums.

A ``bmt.save`` file ``model.pt`` stays a plain torch file; its size and CRC-32 are in a sidecar
``model.pt.manifest.json``. A ``save_sharded`` directory's ``metadata.json`` records each rank
file's size and header CRC and is itself sealed by a checksum; each rank file's header records
the CRC of every tensor in it. Files written before these records existed load unverified, with
one warning per process.

``verify_checkpoint(path)`` runs every check on one process (no collective): for scripts, and
for code that builds on these checkpoints.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO

import bmt_comm

from .atomic import atomic_write
from .checksum import ALGORITHM, crc_of_file, sealed, unseal
from .errors import CheckpointError
from .shard_file import CRC_KEY, ShardHeader, read_header

__all__ = [
    "MANIFEST_SUFFIX", "SHARD_FORMAT", "VerifiedCheckpoint", "check_file", "check_shard",
    "check_shard_files", "manifest_path", "read_manifest", "verify_checkpoint", "warn_unverified",
    "write_manifest",
]

MANIFEST_FORMAT = "bmt-zero-file-manifest"
MANIFEST_SUFFIX = ".manifest.json"
SHARD_FORMAT = "bmt-zero-shard"  # a rank file's __metadata__ "bmt_zero.format"

class _Unverified(set[str]):
    """The kinds of unverified file already warned about (a ``process_state`` slot)."""


def warn_unverified(kind: str, what: str) -> None:
    """One warning per process and ``kind`` of file: old checkpoints load, without checks."""
    warned = bmt_comm.process_state().slot(_Unverified)
    if kind not in warned:
        warned.add(kind)
        warnings.warn(f"{what}: loading without verification (written before checkpoints carried checksums; "
                      "warned once)", stacklevel=3)


# --- bmt.save's single file --------------------------------------------------------------------
def manifest_path(path: str) -> str:
    return path + MANIFEST_SUFFIX


def write_manifest(path: str, size: int, crc: int) -> None:
    """Atomically write the sidecar of the file ``path`` (``size`` bytes, CRC-32 ``crc``)."""
    doc = sealed({"format": MANIFEST_FORMAT, "version": 1, "file": os.path.basename(path), "size": size,
                  "algorithm": ALGORITHM, "crc": f"{crc:08x}"})

    def write(f: BinaryIO) -> None:
        f.write(json.dumps(doc, indent=1).encode())

    atomic_write(manifest_path(path), write)


def read_manifest(path: str) -> dict[str, Any] | None:
    """The sidecar of ``path``, checked; None if there is none (an old file)."""
    side = manifest_path(path)
    try:
        with open(side, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return None
    try:
        doc = json.loads(raw)
        if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT:
            raise ValueError("not a manifest")
        unseal(doc, side)
        int(doc["size"]), int(doc["crc"], 16)
    except (ValueError, KeyError, TypeError) as ex:
        raise CheckpointError(f"the manifest {side} is corrupt ({ex}); remove it to load {path} unverified") from None
    if doc.get("algorithm") != ALGORITHM:
        raise CheckpointError(f"{side}: unknown checksum algorithm {doc.get('algorithm')!r}")
    return doc


def check_file(path: str) -> bool:
    """Check ``path`` against its manifest: size, then CRC of every byte. False: no manifest."""
    found = os.stat(path).st_size  # FileNotFoundError first: a missing file is not an old one
    doc = read_manifest(path)
    if doc is None:
        warn_unverified("file", f"{path} has no {MANIFEST_SUFFIX}")
        return False
    if found != doc["size"]:
        raise CheckpointError(_size_message(path, int(doc["size"]), found))
    crc = crc_of_file(path)
    if crc != int(doc["crc"], 16):
        raise CheckpointError(f"{path} is corrupt: its {ALGORITHM} is {crc:08x}, the manifest records {doc['crc']}")
    return True


def _size_message(path: str, expected: int, found: int) -> str:
    if found < expected:
        return f"{path} is truncated: expected {expected} bytes, found {found}"
    return f"{path} is corrupt: expected {expected} bytes, found {found} (longer)"


# --- save_sharded's directory --------------------------------------------------------------------
def check_shard_files(directory: str, metadata: Mapping[str, Any]) -> None:
    """Every file the metadata names is there, with the recorded size (v1: the size its header
    announces); the metadata agrees with itself about the world size."""
    files: list[str] = list(metadata["files"])
    world = metadata.get("world_size")
    if world != len(files):
        raise CheckpointError(
            f"{os.path.join(directory, 'metadata.json')} is inconsistent: world_size {world} but {len(files)} rank files"
        )
    infos = metadata.get("file_info")
    problems = []
    for r, name in enumerate(files):
        path = os.path.join(directory, name)
        if not os.path.exists(path):
            problems.append(f"rank file {name} (rank {r} of {len(files)}) is missing")
            continue
        found = os.stat(path).st_size
        if infos is not None:
            expected = int(infos[r]["size"])
        else:
            try:
                expected = read_header(path).size
            except ValueError as ex:
                problems.append(str(ex))
                continue
        if found != expected:
            problems.append(_foreign(path, metadata) or _size_message(path, expected, found))
    extra = metadata.get("extra_state")
    if extra is not None and "size" in extra:
        path = os.path.join(directory, extra["file"])
        found = os.stat(path).st_size if os.path.exists(path) else -1
        if found < 0:
            problems.append(f"{path} is missing")
        elif found != extra["size"]:
            problems.append(_size_message(path, int(extra["size"]), found))
    if problems:
        raise CheckpointError(f"the checkpoint {directory} is incomplete or damaged: " + "; ".join(problems)
                              + _other_worlds(directory, len(files)))


def _other_worlds(directory: str, world: int) -> str:
    """A hint when the directory holds rank files of other world sizes than metadata.json's."""
    sizes: dict[int, int] = {}
    for name in os.listdir(directory):
        m = re.fullmatch(r"rank-\d{5}-of-(\d{5})\.safetensors", name)
        if m and int(m.group(1)) != world:
            sizes[int(m.group(1))] = sizes.get(int(m.group(1)), 0) + 1
    if not sizes:
        return ""
    found = ", ".join(f"{n} rank files of world size {w}" for w, n in sorted(sizes.items()))
    return f" (metadata.json is of world size {world}, the directory has {found}: mixed checkpoints?)"


def check_extra_state(directory: str, metadata: Mapping[str, Any]) -> None:
    extra = metadata["extra_state"]
    if "crc" not in extra:
        return
    path = os.path.join(directory, extra["file"])
    crc = crc_of_file(path)
    if crc != int(extra["crc"], 16):
        raise CheckpointError(f"{path} is corrupt: its {ALGORITHM} is {crc:08x}, metadata.json records {extra['crc']}")


def check_shard(directory: str, metadata: Mapping[str, Any], rank: int, keys: Iterable[str]) -> ShardHeader:
    """Check rank file ``rank``'s header and the bytes of its tensors ``keys`` before reading them."""
    name = metadata["files"][rank]
    path = os.path.join(directory, name)
    try:
        header = read_header(path)
    except FileNotFoundError:
        raise CheckpointError(f"rank file {path} is missing") from None
    except ValueError as ex:
        raise CheckpointError(str(ex)) from None
    infos = metadata.get("file_info")
    if infos is not None:
        recorded = int(infos[rank]["header_crc"], 16)
        if header.header_crc != recorded:
            raise CheckpointError(_foreign(path, metadata, header) or (
                f"{path} is corrupt: its header's {ALGORITHM} is {header.header_crc:08x}, metadata.json records {recorded:08x}"
            ))
    crcs: dict[str, int] | None = None
    if CRC_KEY in header.metadata:
        try:
            crcs = {k: int(v) for k, v in json.loads(header.metadata[CRC_KEY]).items()}
        except (ValueError, AttributeError):
            raise CheckpointError(f"{path} is corrupt: its {CRC_KEY} record is not valid") from None
    tensors = metadata["tensors"]
    for key in keys:
        entry = header.tensors.get(key)
        if entry is None:
            raise CheckpointError(f"{path} is corrupt or from another checkpoint: it holds no tensor {key!r}")
        _check_entry(path, key, entry, tensors.get(key), rank)
        if crcs is not None:
            if key not in crcs:
                raise CheckpointError(f"{path} is corrupt: no checksum recorded for tensor {key!r}")
            start, end = (int(v) for v in entry["data_offsets"])
            crc = crc_of_file(path, header.data_start + start, end - start)
            if crc != crcs[key]:
                raise CheckpointError(
                    f"{path} is corrupt: tensor {key!r}'s {ALGORITHM} is {crc:08x}, its header records {crcs[key]:08x}"
                )
    return header


def _foreign(path: str, metadata: Mapping[str, Any], header: ShardHeader | None = None) -> str | None:
    """The message for a rank file written by another save than ``metadata``'s, if it is one."""
    if "save_id" not in metadata:
        return None
    if header is None:
        try:
            header = read_header(path)
        except (OSError, ValueError):
            return None
    meta = header.metadata
    if meta.get("bmt_zero.save_id") in (None, metadata["save_id"]):
        return None
    return (f"{path} belongs to another checkpoint: it was written by save {meta.get('bmt_zero.save_id')!r} "
            f"(rank {meta.get('bmt_zero.rank')} of {meta.get('bmt_zero.world_size')}), metadata.json is "
            f"save {metadata['save_id']!r} (world size {metadata.get('world_size')})")


_ELEMENT = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
            "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
_CODE = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64", "int32": "I32",
         "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL", "float8_e4m3fn": "F8_E4M3",
         "float8_e5m2": "F8_E5M2", "uint16": "U16", "uint32": "U32", "uint64": "U64"}


def _check_entry(path: str, key: str, entry: Mapping[str, Any], info: Mapping[str, Any] | None, rank: int) -> None:
    """The file's tensor has the dtype and element count the metadata gives it."""
    if info is None:
        return
    numel = 1
    for d in entry.get("shape", []):
        numel *= int(d)
    start, end = (int(v) for v in entry["data_offsets"])
    code = entry.get("dtype")
    if code != _CODE.get(info["dtype"]) or end - start != numel * _ELEMENT.get(str(code), 0):
        raise CheckpointError(f"{path} does not match metadata.json: tensor {key!r} is {code} x {numel} in the file")
    if info["kind"] == "replicated":
        want = 1
        for d in info["shape"]:
            want *= int(d)
    else:
        want = sum(e - s for r, _, s, e in info["pieces"] if r == rank)
    if numel != want:
        raise CheckpointError(
            f"{path} does not match metadata.json: tensor {key!r} has {numel} elements in the file, "
            f"metadata.json gives this rank {want}"
        )


def read_sharded_metadata(directory: str, fmt: str, versions: tuple[int, ...]) -> dict[str, Any]:
    """``metadata.json``, parsed and checked against its own checksum."""
    path = os.path.join(directory, "metadata.json")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: {directory} is not a sharded checkpoint (or is incomplete)") from None
    try:
        metadata = json.loads(raw)
    except ValueError as ex:
        raise CheckpointError(f"{path} is corrupt or truncated ({len(raw)} bytes): not valid JSON ({ex})") from None
    if not isinstance(metadata, dict) or metadata.get("format") != fmt or metadata.get("version") not in versions:
        got = metadata if not isinstance(metadata, dict) else (metadata.get("format"), metadata.get("version"))
        raise CheckpointError(f"{path} is not a {fmt} checkpoint of version {versions} (format, version: {got!r})")
    try:
        unseal(metadata, path)
    except ValueError as ex:
        raise CheckpointError(str(ex)) from None
    if "checksum" not in metadata:
        warn_unverified("sharded", f"{path} has no checksum")
    return metadata


@dataclass(frozen=True)
class VerifiedCheckpoint:
    """What ``verify_checkpoint`` checked."""

    path: str
    kind: str  # "file" (bmt.save) or "sharded" (save_sharded)
    verified: bool  # False: an old checkpoint without checksums (only its structure was checked)
    files: tuple[str, ...]  # the files read
    tensors: int  # the tensors whose bytes were checked


def verify_checkpoint(path: str | os.PathLike[str]) -> VerifiedCheckpoint:
    """Check a checkpoint on this process alone, reading every byte once: a ``bmt.save`` file
    (size and CRC against its manifest) or a ``save_sharded`` directory (metadata checksum, every
    rank file's size, header CRC and every tensor's CRC, the extra state). Raises
    :class:`CheckpointError` naming the file (and tensor) at fault; loads nothing."""
    from .sharded import FORMAT, VERSIONS  # the layout's constants live with its writer

    target = os.path.abspath(os.fspath(path))
    if os.path.isdir(target):
        metadata = read_sharded_metadata(target, FORMAT, VERSIONS)
        check_shard_files(target, metadata)
        files = [os.path.join(target, "metadata.json")]
        count = 0
        for r, name in enumerate(metadata["files"]):
            keys = [k for k, info in metadata["tensors"].items() if any(p[0] == r for p in info["pieces"])]
            header = check_shard(target, metadata, r, [k for k in keys if _holds(metadata, k, r)])
            files.append(os.path.join(target, name))
            count += len(header.tensors)
        if metadata.get("extra_state"):
            check_extra_state(target, metadata)
            files.append(os.path.join(target, metadata["extra_state"]["file"]))
        verified = "checksum" in metadata
        return VerifiedCheckpoint(target, "sharded", verified, tuple(files), count if verified else 0)
    verified = check_file(target)
    return VerifiedCheckpoint(target, "file", verified, (target,), 0)


def _holds(metadata: Mapping[str, Any], key: str, rank: int) -> bool:
    """Rank file ``rank`` holds ``key``: a non-empty piece, or the whole of a replicated tensor."""
    info = metadata["tensors"][key]
    if info["kind"] == "replicated":
        return bool(info["pieces"][0][0] == rank)
    return any(p[0] == rank and p[3] > p[2] for p in info["pieces"])
