"""``save_checkpoint``: model, optimizers, schedulers, loss scale, every rank's RNG, the step and
user objects, written as one directory that appears whole or not at all."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
import warnings
from collections.abc import Mapping
from typing import Any, BinaryIO

import bmt_comm
import torch
from bmt_zero.store import save as save_gathered
from bmt_zero.store import save_sharded
from bmt_zero.store.atomic import atomic_write, fsync_dir, replace_dir

from ._agree import CheckpointError, agree, describe, settle
from ._files import FORMAT, LATEST_FILE, MANIFEST_FILE, VERSION, FileRecord, rank_file, write_file
from ._optim import layout_of, resolve
from ._rng import capture_rng
from ._signature import Signature, local_signature, union

__all__ = ["save_checkpoint", "MODEL_DIR", "MODEL_FILE"]

MODEL_DIR = "model"  # sharded: save_sharded's directory
MODEL_FILE = "model.pt"  # gathered: bmt.save's file
_TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _check_arguments(step: int, keep_last: int | None, tag: str) -> None:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1):
        raise ValueError(f"keep_last must be None or an int >= 1, got {keep_last!r}")
    if not _TAG.fullmatch(tag) or tag == LATEST_FILE:
        raise ValueError(f"tag must be a plain name of letters, digits, '.', '_', '-' (not {LATEST_FILE!r}), got {tag!r}")


def _model_files(tmp: str, sharded: bool) -> list[FileRecord]:
    """The model's files with their sizes (their contents are checked by the store's loaders)."""
    if not sharded:
        return [FileRecord(MODEL_FILE, os.path.getsize(os.path.join(tmp, MODEL_FILE)), None)]
    out = []
    for here, _, files in os.walk(os.path.join(tmp, MODEL_DIR)):
        for f in sorted(files):
            path = os.path.join(here, f)
            out.append(FileRecord(os.path.relpath(path, tmp).replace(os.sep, "/"), os.path.getsize(path), None))
    return out


def _write_json(path: str, obj: Any) -> None:
    def write(f: BinaryIO) -> None:
        f.write(json.dumps(obj, indent=1).encode())

    atomic_write(path, write)


def _write_latest(root: str, tag: str) -> None:
    def write(f: BinaryIO) -> None:
        f.write(f"{tag}\n".encode())

    atomic_write(os.path.join(root, LATEST_FILE), write)


def _complete_checkpoints(root: str) -> list[tuple[float, int, str]]:
    """(saved_at, step, tag) of each complete checkpoint directly under ``root``."""
    out = []
    for name in os.listdir(root):
        path = os.path.join(root, name, MANIFEST_FILE)
        if name.startswith(".") or not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                m = json.load(f)
        except (OSError, ValueError):
            continue  # not ours to judge, nor to delete
        if m.get("format") == FORMAT:
            out.append((float(m.get("saved_at", 0.0)), int(m.get("step", 0)), name))
    return out


def _prune(root: str, keep_last: int, current: str) -> None:
    """Remove all but the ``keep_last`` most recently saved checkpoints (never ``current``).

    Each goes first to a hidden name (one rename: it stops being a checkpoint at once), then is
    deleted. A failure here is a warning: the new checkpoint is complete and ``latest`` names it.
    """
    found = sorted((c for c in _complete_checkpoints(root) if c[2] != current), reverse=True)
    for _, _, tag in found[keep_last - 1 :]:
        aside = os.path.join(root, f".{tag}.old-{uuid.uuid4().hex}")
        try:
            os.rename(os.path.join(root, tag), aside)
            fsync_dir(root)
            shutil.rmtree(aside)
        except OSError as ex:
            warnings.warn(f"save_checkpoint: could not remove the old checkpoint {tag!r} ({ex})", stacklevel=3)


def save_checkpoint(
    directory: str | os.PathLike[str],
    model: torch.nn.Module,
    optimizer: Any = None,
    lr_scheduler: Any = None,
    *,
    step: int,
    extra: Mapping[str, Any] | None = None,
    keep_last: int | None = None,
    sharded: bool = True,
    tag: str | None = None,
) -> str:
    """Collective: save a training checkpoint as ``directory/<tag>`` and point ``directory/latest``
    at it; return its path.

    ``optimizer``: an ``OptimManager`` (its optimizers, schedulers and loss scale), an optimizer,
    a sequence of optimizers, or None. ``lr_scheduler``: schedulers not added to the manager.
    ``extra``: picklable objects of this rank (each rank's are saved; ``load_checkpoint`` returns
    them). ``tag`` defaults to ``step-<step, 8 digits>``. ``keep_last=K`` removes all but the K
    most recently saved checkpoints under ``directory``, once the new one is complete.
    ``sharded=False`` saves the model gathered, as ``bmt.save`` does (one file, rank 0 writes it).

    The checkpoint is written into a temporary directory next to its final place; every file is
    fsynced, a manifest listing them (sizes and SHA-256) is written last, then the directory is
    renamed into place and ``latest`` replaced atomically. A failure on any rank raises
    ``CheckpointError`` on every rank and leaves the previous checkpoint and ``latest`` as they were.
    """
    ctx = bmt_comm.get_context()
    world, topo = ctx.comms.world, ctx.topology
    rank, size = world.rank, world.size
    tag = tag if tag is not None else f"step-{step:08d}" if isinstance(step, int) else ""
    root = os.path.abspath(os.fspath(directory))
    final = os.path.join(root, tag)
    own: str | None = None
    try:
        _check_arguments(step, keep_last, tag)
        state = resolve(optimizer, lr_scheduler)
    except (TypeError, ValueError) as ex:
        own = describe(ex)
    args = (step, tag, keep_last, bool(sharded))
    everyone = bmt_comm.allgather_objects((own, args), world)
    settle([e[0] for e in everyone], "save_checkpoint: bad arguments")
    if any(e[1] != args for e in everyone):
        raise CheckpointError(
            f"save_checkpoint: every rank must pass the same step, tag, keep_last and sharded, "
            f"got {[e[1] for e in everyone]}"
        )
    token = bmt_comm.broadcast_object(uuid.uuid4().hex if rank == 0 else None, world, 0)
    tmp = os.path.join(root, f".{tag}.tmp-{token}")

    def cleanup() -> None:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)

    own = None
    if rank == 0:
        try:
            os.makedirs(root, exist_ok=True)
            os.makedirs(tmp)
        except OSError as ex:
            own = describe(ex)
    agree(own, f"save_checkpoint to {final}", cleanup)  # nobody writes before the directory exists

    try:
        if sharded:
            save_sharded(model, os.path.join(tmp, MODEL_DIR))
        else:
            save_gathered(model, os.path.join(tmp, MODEL_FILE))
    except Exception as ex:  # the store raises on every rank alike
        cleanup()
        raise CheckpointError(f"save_checkpoint to {final}: saving the model failed: {describe(ex)}") from ex

    records: list[FileRecord] = []
    own = None
    try:
        records.append(write_file(tmp, rank_file("optim", rank, size), state.payload()))
        meta = {
            "rank": rank, "world_size": size, "stage": topo.stage_id, "tp": topo.tp_id,
            "layouts": [[tuple(e) for e in layout_of(o)] for o in state.optimizers],
            "rng": capture_rng(ctx.device),
        }
        records.append(write_file(tmp, rank_file("meta", rank, size), meta))
        records.append(write_file(tmp, rank_file("extra", rank, size), dict(extra) if extra is not None else None))
    except Exception as ex:
        own = describe(ex)
    sig = local_signature(model)
    gathered: list[tuple[str | None, list[FileRecord], Signature]] = bmt_comm.allgather_objects(
        (own, records, sig), world
    )
    settle([g[0] for g in gathered], f"save_checkpoint to {final}", cleanup)

    own = None
    if rank == 0:  # every rank has written and fsynced its files: the manifest, then the rename
        try:
            files = {r.name: r.to_json() for _, recs, _ in gathered for r in recs}
            files.update({r.name: r.to_json() for r in _model_files(tmp, sharded)})
            manifest = {
                "format": FORMAT, "version": VERSION, "step": step, "tag": tag, "saved_at": time.time(),
                "world_size": size, "tp_size": topo.tp_size, "pipe_size": topo.pipe_size,
                "model": {"kind": "sharded" if sharded else "gathered", "path": MODEL_DIR if sharded else MODEL_FILE,
                          "signature": union([s for _, _, s in gathered])},
                "optimizer": state.describe(), "checksum": "sha256", "files": files,
                "torch": torch.__version__,
            }
            _write_json(os.path.join(tmp, MANIFEST_FILE), manifest)
            replace_dir(tmp, final)
        except Exception as ex:
            own = describe(ex)
            cleanup()
        else:
            try:
                _write_latest(root, tag)
            except Exception as ex:  # the new checkpoint is complete; latest still names the previous one
                own = describe(ex)
            if own is None and keep_last is not None:
                _prune(root, keep_last, tag)
    agree(own, f"save_checkpoint to {final}")
    return final
