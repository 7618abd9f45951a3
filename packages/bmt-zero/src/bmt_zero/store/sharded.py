"""Sharded checkpoints: every rank writes its own pieces, in parallel; any world size reads them.

Layout of a checkpoint directory::

    metadata.json                           names, full shapes, dtypes, each rank's pieces
    rank-00000-of-00004.safetensors         rank 0's pieces + every non-sharded tensor
    rank-00001-of-00004.safetensors         ...

A piece is ``[start, end)`` of the flattened tensor (of its tensor-parallel slice for tp-split
parameters). Loading reads, for each parameter, only the pieces that overlap this rank's new
range, through safetensors' lazy slices. The directory is written under a temporary name and
renamed into place once complete, so a half-written checkpoint never has the final name.
Ranks must share the filesystem that holds ``directory``.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Mapping
from typing import Any, BinaryIO

import bmt_comm
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.nn.modules.module import _IncompatibleKeys

from ..parameter import DistributedParameter
from .atomic import atomic_write, describe, replace_dir

__all__ = ["save_sharded", "load_sharded", "shard_file_name", "METADATA_FILE", "FORMAT"]

FORMAT = "bmt-zero-sharded"
VERSION = 1
METADATA_FILE = "metadata.json"

Piece = tuple[int, int, int]  # (tp rank, start, end)


def shard_file_name(rank: int, world_size: int) -> str:
    return f"rank-{rank:05d}-of-{world_size:05d}.safetensors"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} in sharded checkpoint metadata")
    return dtype


def _state_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers under their state-dict keys (a Block adds no infix)."""
    out: dict[str, torch.Tensor] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        base = mod_name + "." if mod_name else ""
        for name, param in module._parameters.items():
            if param is not None:
                out.setdefault(base + name, param)
        for name, buf in module._buffers.items():
            if buf is not None and name not in module._non_persistent_buffers_set:
                out.setdefault(base + name, buf)
    return out


def _full_shape(param: DistributedParameter) -> torch.Size:
    return param._tp_original_shape if param._tp_mode else param._original_shape


def _tp_split(param: DistributedParameter, tp_size: int) -> bool:
    return param._tp_mode and param._tp_split_dim >= 0 and tp_size > 1


def _local_piece(key: str, param: DistributedParameter) -> torch.Tensor:
    piece = param.detach().reshape(-1)
    if piece.numel() != param._end_partition - param._start_partition:
        raise RuntimeError(
            f"{key}: holds {piece.numel()} elements but its range is "
            f"[{param._start_partition}, {param._end_partition}); save a released (sharded) model"
        )
    return piece


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _raise_first(statuses: list[str | None], own: BaseException | None, what: str) -> None:
    for rank, message in enumerate(statuses):
        if message is not None:
            if own is not None:
                raise own
            raise RuntimeError(f"{what} failed on rank {rank}: {message}")


def save_sharded(model: torch.nn.Module, directory: str | os.PathLike[str]) -> None:
    """Collective: each rank writes its shards of ``model`` into ``directory`` (replacing an older
    checkpoint there only once the new one is complete)."""
    ctx = bmt_comm.get_context()
    world = ctx.comms.world
    tp = ctx.comms.tp
    rank, size = world.rank, world.size
    final = os.path.abspath(os.fspath(directory))
    token = bmt_comm.broadcast_object(uuid.uuid4().hex if rank == 0 else None, world, 0)
    tmp = os.path.join(os.path.dirname(final), f".{os.path.basename(final)}.tmp-{token}")
    error: BaseException | None = None
    if rank == 0:
        try:
            os.makedirs(tmp)
        except Exception as ex:
            error = ex
    _raise_first(bmt_comm.allgather_objects(describe(error), world), error, "save_sharded")

    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)
    tensors: dict[str, torch.Tensor] = {}
    pieces: dict[str, Piece] = {}
    infos: dict[str, dict[str, Any]] = {}
    try:
        for key, t in _state_tensors(model).items():
            info: dict[str, Any] = {"dtype": _dtype_name(t.dtype)}
            if isinstance(t, DistributedParameter):
                piece = _local_piece(key, t)
                start, end = t._start_partition, t._end_partition
                if end > start:
                    tensors[key] = piece.to("cpu", copy=True)
                pieces[key] = (tp.rank if t._tp_mode else 0, start, end)
                info.update(kind="sharded", shape=list(_full_shape(t)), local_shape=list(t._original_shape),
                            tp_mode=t._tp_mode, tp_split_dim=t._tp_split_dim)
            else:
                info.update(kind="replicated", shape=list(t.shape))
                if rank == 0:
                    tensors[key] = t.detach().to("cpu", copy=True).contiguous()
            infos[key] = info
        path = os.path.join(tmp, shard_file_name(rank, size))
        save_file(tensors, path)
        _fsync_file(path)
    except Exception as ex:
        error = ex
    del tensors
    gathered = bmt_comm.allgather_objects((describe(error), pieces), world)
    statuses = [status for status, _ in gathered]
    if any(statuses):
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        bmt_comm.synchronize()  # every rank raises only once the temporary is gone
    _raise_first(statuses, error, "save_sharded")

    if rank == 0:
        try:
            for key, info in infos.items():
                if info["kind"] == "sharded":
                    info["pieces"] = [[r, *ranks_pieces[key]] for r, (_, ranks_pieces) in enumerate(gathered)
                                      if ranks_pieces[key][2] > ranks_pieces[key][1]]
                else:
                    info["pieces"] = [[0, 0, 0, torch.Size(info["shape"]).numel()]]
            metadata = {
                "format": FORMAT, "version": VERSION, "world_size": size, "tp_size": tp.size,
                "files": [shard_file_name(r, size) for r in range(size)], "tensors": infos,
            }

            def write(f: BinaryIO) -> None:
                f.write(json.dumps(metadata, indent=1).encode())

            atomic_write(os.path.join(tmp, METADATA_FILE), write)
            replace_dir(tmp, final)
        except Exception as ex:
            error = ex
            shutil.rmtree(tmp, ignore_errors=True)
    _raise_first(bmt_comm.allgather_objects(describe(error), world), error, "save_sharded")


class _Reader:
    """Rank files opened lazily; tensors and slices are read, not the whole file."""

    def __init__(self, directory: str, files: list[str]) -> None:
        self._directory = directory
        self._files = files
        self._open: dict[int, Any] = {}

    def _handle(self, rank: int) -> Any:
        if rank not in self._open:
            self._open[rank] = safe_open(os.path.join(self._directory, self._files[rank]), framework="pt",
                                         device="cpu")
        return self._open[rank]

    def slice(self, rank: int, key: str, start: int, end: int) -> torch.Tensor:
        out: torch.Tensor = self._handle(rank).get_slice(key)[start:end]
        return out

    def tensor(self, rank: int, key: str) -> torch.Tensor:
        out: torch.Tensor = self._handle(rank).get_tensor(key)
        return out


def _read_metadata(directory: str) -> dict[str, Any]:
    path = os.path.join(directory, METADATA_FILE)
    with open(path, encoding="utf-8") as f:
        metadata: dict[str, Any] = json.load(f)
    if metadata.get("format") != FORMAT or metadata.get("version") != VERSION:
        raise ValueError(
            f"{path} is not a {FORMAT} v{VERSION} checkpoint "
            f"(format={metadata.get('format')!r}, version={metadata.get('version')!r})"
        )
    return metadata


def _fill(target: torch.Tensor, start: int, end: int, info: Mapping[str, Any], tp_rank: int,
          reader: _Reader, key: str) -> int:
    """Copy the saved elements ``[start, end)`` (of tp slice ``tp_rank``) into ``target``; count them."""
    covered = 0
    for r, piece_tp, s, e in info["pieces"]:
        if piece_tp != tp_rank:
            continue
        a, b = max(s, start), min(e, end)
        if a < b:
            target[a - start : b - start].copy_(reader.slice(r, key, a - s, b - s))
            covered += b - a
    return covered


def _load_param(key: str, param: DistributedParameter, info: Mapping[str, Any], saved_tp: int,
                reader: _Reader) -> str | None:
    tp = bmt_comm.get_context().comms.tp
    start, end = param._start_partition, param._end_partition
    target = param.data.view(-1)
    if info["kind"] == "replicated":
        full = reader.tensor(0, key)
        if param._tp_mode and param._tp_split_dim >= 0:
            size = param._original_shape[param._tp_split_dim]
            full = full.narrow(param._tp_split_dim, tp.rank * size, size)
        target.copy_(full.reshape(-1)[start:end])
        return None
    saved_split = info["tp_mode"] and info["tp_split_dim"] >= 0 and saved_tp > 1
    split = _tp_split(param, tp.size)
    if saved_split != split or (split and (saved_tp != tp.size or info["tp_split_dim"] != param._tp_split_dim)):
        return (
            f"{key}: saved tensor-parallel layout (tp_size={saved_tp}, split dim {info['tp_split_dim']}) "
            f"differs from the model's (tp_size={tp.size}, split dim {param._tp_split_dim if split else -1})"
        )
    covered = _fill(target, start, end, info, tp.rank if split else 0, reader, key)
    if covered != end - start:
        return f"{key}: the checkpoint's pieces cover {covered} of this rank's {end - start} elements"
    return None


def _load_plain(key: str, tensor: torch.Tensor, info: Mapping[str, Any], saved_tp: int,
                reader: _Reader) -> str | None:
    if info["kind"] == "replicated":
        tensor.copy_(reader.tensor(0, key))
        return None
    if info["tp_mode"] and info["tp_split_dim"] >= 0 and saved_tp > 1:
        return f"{key}: a tensor-parallel split parameter can't be loaded into a plain tensor"
    numel = tensor.numel()
    full = torch.empty(numel, dtype=_dtype(info["dtype"]))
    if _fill(full, 0, numel, info, 0, reader, key) != numel:
        return f"{key}: the checkpoint's pieces do not cover the whole tensor"
    tensor.copy_(full.view(tensor.shape))
    return None


def load_sharded(model: torch.nn.Module, directory: str | os.PathLike[str], strict: bool = True) -> _IncompatibleKeys:
    """Collective: load a checkpoint written by ``save_sharded`` at any world size.

    Missing/unexpected keys and shape mismatches are reported as torch's ``load_state_dict`` does.
    """
    ctx = bmt_comm.get_context()
    world = ctx.comms.world
    path = os.path.abspath(os.fspath(directory))
    header: tuple[str | None, dict[str, Any] | None] | None = None
    error: BaseException | None = None
    if world.rank == 0:
        try:
            header = (None, _read_metadata(path))
        except Exception as ex:
            error = ex
            header = (describe(ex), None)
    header = bmt_comm.broadcast_object(header, world, 0)
    assert header is not None
    _raise_first([header[0]], error, f"reading {path}")
    metadata = header[1]
    assert metadata is not None
    saved: dict[str, Any] = metadata["tensors"]
    saved_tp: int = metadata["tp_size"]
    reader = _Reader(path, metadata["files"])
    own = _state_tensors(model)
    missing = [k for k in own if k not in saved]
    unexpected = [k for k in saved if k not in own]
    errors: list[str] = []
    with torch.no_grad():
        for key, t in own.items():
            info = saved.get(key)
            if info is None:
                continue
            shape = torch.Size(info["shape"])
            expected = _full_shape(t) if isinstance(t, DistributedParameter) else t.shape
            if shape != expected:
                errors.append(
                    f"size mismatch for {key}: copying a param with shape {shape} from checkpoint, "
                    f"the shape in current model is {expected}."
                )
                continue
            if isinstance(t, DistributedParameter):
                message = _load_param(key, t, info, saved_tp, reader)
            else:
                message = _load_plain(key, t, info, saved_tp, reader)
            if message is not None:
                errors.append(message)
    # per-rank problems (pieces missing for one rank's range) become everyone's
    everyone = bmt_comm.allgather_objects(errors, world)
    errors = list(dict.fromkeys(m for rank_errors in everyone for m in rank_errors))
    if strict:
        if unexpected:
            errors.insert(0, "Unexpected key(s) in state_dict: {}. ".format(", ".join(f'"{k}"' for k in unexpected)))
        if missing:
            errors.insert(0, "Missing key(s) in state_dict: {}. ".format(", ".join(f'"{k}"' for k in missing)))
    if errors:
        raise RuntimeError(
            "Error(s) in loading state_dict for {}:\n\t{}".format(type(model).__name__, "\n\t".join(errors))
        )
    return _IncompatibleKeys(missing, unexpected)
