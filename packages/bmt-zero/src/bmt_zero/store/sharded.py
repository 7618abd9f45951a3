"""Sharded checkpoints: every rank writes its own pieces, in parallel; any world size reads them.

Layout of a checkpoint directory::

    metadata.json                           names, full shapes, dtypes, each rank's pieces
    rank-00000-of-00004.safetensors         rank 0's pieces + every non-sharded tensor
    rank-00001-of-00004.safetensors         ...
    extra_state.pt                          modules' get_extra_state() objects (torch.save), if any

``metadata.json`` records each rank file's size and header CRC-32 and the save's id, and is
sealed by a checksum of its own; each rank file's header records its save id and every tensor's
CRC-32. ``load_sharded`` checks the sizes (rank 0, every file), then the header and the bytes of
each tensor a rank is about to read, then keys, shapes and coverage against the model, and only
then copies: a failed load raises the same :class:`CheckpointError` on every rank and leaves the
model as it was.

A piece is ``[start, end)`` of the flattened tensor (of its tensor-parallel slice for tp-split
parameters). Loading reads, for each parameter, only the pieces that overlap this rank's new
range, through safetensors' lazy slices. A tp-split parameter also loads at another tp size (or
without tensor parallelism): each rank then assembles its new tp slice from the saved slices
that overlap it along the split dimension, holding that one slice in host memory. The directory is written under a temporary name and
renamed into place once complete, so a half-written checkpoint never has the final name.
Ranks must share the filesystem that holds ``directory``.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO, cast

import bmt_comm
import torch
from safetensors import safe_open
from torch.nn.modules.module import _IncompatibleKeys

from ..model_check import check_model_alike
from ..parameter import DistributedParameter
from .atomic import atomic_write, replace_dir
from .checksum import ALGORITHM, HashingWriter, sealed
from .errors import CheckpointError, agree, raise_agreed, status_of, write_failure
from .model_keys import KeyedTensor, Path, extra_state_entries, merge_keys, state_entries
from .report import load_problems
from .shard_file import ShardHeader, write_shard
from .verify import SHARD_FORMAT, check_extra_state, check_shard, check_shard_files, read_sharded_metadata

__all__ = ["save_sharded", "load_sharded", "shard_file_name", "METADATA_FILE", "FORMAT", "VERSION", "VERSIONS"]

FORMAT = "bmt-zero-sharded"
VERSION = 2  # 2: sizes and checksums (metadata.json and each rank file's header)
VERSIONS = (1, 2)  # loadable: version 1 without verification
METADATA_FILE = "metadata.json"
EXTRA_STATE_FILE = "extra_state.pt"  # not tensors: safetensors can't hold them

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


@dataclass(frozen=True)
class _Described:
    """One rank's account of one of its tensors: its key, place in the model, metadata, piece."""

    key: str
    path: Path
    info: dict[str, Any]
    piece: Piece | None  # None: not a DistributedParameter (saved whole, by its first holder)


def _describe(entries: list[KeyedTensor], tp_rank: int) -> list[_Described]:
    out = []
    for e in entries:
        t = e.tensor
        info: dict[str, Any] = {"dtype": _dtype_name(t.dtype)}
        piece: Piece | None = None
        if isinstance(t, DistributedParameter):
            _local_piece(e.key, t)  # a gathered parameter can't be saved as a piece
            piece = (tp_rank if t._tp_mode else 0, t._start_partition, t._end_partition)
            info.update(kind="sharded", shape=list(_full_shape(t)), local_shape=list(t._original_shape),
                        tp_mode=t._tp_mode, tp_split_dim=t._tp_split_dim)
        else:
            info.update(kind="replicated", shape=list(t.shape))
        out.append(_Described(e.key, e.path, info, piece))
    return out


def _merge(ranks: list[list[_Described]]) -> dict[str, dict[str, Any]]:
    """Every rank's descriptions as the metadata's ``tensors``, in model order (the same on every
    rank). A rank holding only a part of the model (a pipeline stage) describes only that part."""
    first: dict[str, _Described] = {}
    pieces: dict[str, list[list[int]]] = {}
    owner: dict[str, int] = {}
    for rank, described in enumerate(ranks):
        for d in described:
            seen = first.setdefault(d.key, d)
            owner.setdefault(d.key, rank)
            for field in ("kind", "dtype", "shape"):
                if seen.info[field] != d.info[field]:
                    raise ValueError(
                        f"save_sharded: the ranks' models must agree on each tensor, but {d.key!r} has "
                        f"{field} {seen.info[field]} on rank {owner[d.key]} and {d.info[field]} on rank {rank}"
                    )
            if d.piece is not None and d.piece[2] > d.piece[1]:
                pieces.setdefault(d.key, []).append([rank, *d.piece])
    infos: dict[str, dict[str, Any]] = {}
    for key in merge_keys([(d.key, d.path) for d in described] for described in ranks):
        info = dict(first[key].info)
        if info["kind"] == "sharded":
            info["pieces"] = pieces.get(key, [])
        else:  # written whole by the lowest rank that holds it
            info["pieces"] = [[owner[key], 0, 0, torch.Size(info["shape"]).numel()]]
        infos[key] = info
    return infos


def _on_cpu(obj: Any) -> Any:
    """``obj`` with every tensor in it (through dicts, lists and tuples) copied to the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return type(obj)((k, _on_cpu(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_on_cpu(v) for v in obj)
    return obj


Extra = tuple[str, Path, Any]  # (key, path, the module's get_extra_state())


def _merge_extra(ranks: list[list[Extra]]) -> tuple[list[list[Any]], dict[str, Any]]:
    """The extra states of every rank: ``[[key, path], ...]`` in model order, and the objects
    (from the lowest rank holding each key)."""
    values: dict[str, Any] = {}
    for extras in ranks:
        for key, _, value in extras:
            values.setdefault(key, value)
    keys = merge_keys([(k, p) for k, p, _ in extras] for extras in ranks)
    paths = {k: list(p) for extras in ranks for k, p, _ in extras}
    return [[k, paths[k]] for k in keys], {k: values[k] for k in keys}


def _settle(error: BaseException | None, what: str, tmp: str) -> None:
    """Collective: raise a failure on every rank alike, once rank 0 has removed the temporary directory."""
    world = bmt_comm.get_context().comms.world
    try:
        agree(error, world, what)
    except BaseException:
        if world.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        bmt_comm.synchronize()
        raise


def _write_rank_file(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                     final: str) -> ShardHeader:
    """Write and fsync one rank file; a failure is an ``OSError`` naming the path and the cause."""
    sink: HashingWriter | None = None
    try:
        with open(path, "wb") as f:
            sink = HashingWriter(f, hashing=False)  # each tensor's CRC is taken from memory instead
            header = write_shard(path, tensors, metadata, sink)
            sink.flush()
            os.fsync(f.fileno())
    except Exception as ex:
        raise write_failure(path, ex, sink.error if sink else None, sink.size if sink else 0, final) from ex
    return header


def save_sharded(model: torch.nn.Module, directory: str | os.PathLike[str]) -> None:
    """Collective: each rank writes its shards of ``model`` into ``directory`` (replacing an older
    checkpoint there only once the new one is complete).

    A model spread over ranks (a pipeline: ``children_everywhere``) is saved whole: each rank
    writes the pieces it holds, the metadata describes every rank's tensors.
    """
    check_model_alike(model, "save_sharded")  # a rank with another model fails here, alike everywhere
    bmt_comm.flush_pending_writes()  # a delayed optimizer update in flight lands before the values are read
    ctx = bmt_comm.get_context()
    world = ctx.comms.world
    tp = ctx.comms.tp
    rank, size = world.rank, world.size
    final = os.path.abspath(os.fspath(directory))
    token = bmt_comm.broadcast_object(uuid.uuid4().hex if rank == 0 else None, world, 0)
    tmp = os.path.join(os.path.dirname(final), f".{os.path.basename(final)}.tmp-{token}")
    error: BaseException | None = None
    entries: list[KeyedTensor] = []
    described: list[_Described] = []
    extras: list[Extra] = []
    try:
        if rank == 0:
            os.makedirs(tmp)
        entries = state_entries(model)
        described = _describe(entries, tp.rank)
        extras = [(e.key, e.path, _on_cpu(e.module.get_extra_state()))
                  for e in extra_state_entries(model, "get_extra_state")]
    except Exception as ex:
        error = ex
    gathered = bmt_comm.allgather_objects((status_of(error), described, extras), world)
    statuses = [status for status, _, _ in gathered]
    if any(statuses):
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        bmt_comm.synchronize()
        raise_agreed(statuses, world, f"save_sharded to {final!r}", error)
    infos: dict[str, dict[str, Any]] = {}
    try:
        infos = _merge([d for _, d, _ in gathered])  # the same on every rank: all raise alike
    except ValueError:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        bmt_comm.synchronize()
        raise
    extra_keys, extra_values = _merge_extra([x for _, _, x in gathered])
    del gathered, extras

    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)
    tensors: dict[str, torch.Tensor] = {}
    written: ShardHeader | None = None
    try:
        for e, d in zip(entries, described, strict=True):
            t = e.tensor
            if d.piece is not None:
                if d.piece[2] > d.piece[1]:
                    tensors[e.key] = t.detach().reshape(-1).to("cpu", copy=True)
            elif infos[e.key]["pieces"][0][0] == rank:
                tensors[e.key] = t.detach().to("cpu", copy=True).contiguous()
        path = os.path.join(tmp, shard_file_name(rank, size))
        written = _write_rank_file(path, tensors, {
            "bmt_zero.format": SHARD_FORMAT, "bmt_zero.save_id": token, "bmt_zero.rank": str(rank),
            "bmt_zero.world_size": str(size),
        }, final)
    except Exception as ex:
        error = ex
    del tensors
    _settle(error, f"save_sharded to {final!r}", tmp)
    assert written is not None
    file_info = bmt_comm.allgather_objects({"size": written.size, "header_crc": f"{written.header_crc:08x}"}, world)

    if rank == 0:
        try:
            metadata: dict[str, Any] = {
                "format": FORMAT, "version": VERSION, "world_size": size, "tp_size": tp.size, "save_id": token,
                "algorithm": ALGORITHM, "files": [shard_file_name(r, size) for r in range(size)],
                "file_info": file_info, "tensors": infos,
            }
            if extra_keys:
                sink = _write_extra(os.path.join(tmp, EXTRA_STATE_FILE), extra_values, final)
                metadata["extra_state"] = {"file": EXTRA_STATE_FILE, "keys": extra_keys, "size": sink.size,
                                           "crc": f"{sink.crc:08x}"}
            sealed_metadata = sealed(metadata)

            def write(f: BinaryIO) -> None:
                f.write(json.dumps(sealed_metadata, indent=1).encode())

            meta_path = os.path.join(tmp, METADATA_FILE)
            try:
                atomic_write(meta_path, write)
            except Exception as ex:
                raise write_failure(meta_path, ex, None, 0, final) from ex
            replace_dir(tmp, final)
        except Exception as ex:
            error = ex
            shutil.rmtree(tmp, ignore_errors=True)
    agree(error, world, f"save_sharded to {final!r}")


def _write_extra(path: str, values: dict[str, Any], final: str) -> HashingWriter:
    sink: HashingWriter | None = None

    def write(f: BinaryIO) -> None:
        nonlocal sink
        sink = HashingWriter(f)
        torch.save(values, cast(BinaryIO, sink))
        sink.flush()

    try:
        atomic_write(path, write)
    except Exception as ex:
        raise write_failure(path, ex, sink.error if sink else None, sink.size if sink else 0, final) from ex
    assert sink is not None
    return sink


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


class _Uncovered(Exception):
    """The checkpoint's pieces leave elements of a tensor unwritten."""


def _saved_slice(key: str, info: Mapping[str, Any], tp_rank: int, shape: torch.Size, reader: _Reader) -> torch.Tensor:
    """Saved tensor-parallel slice ``tp_rank`` of ``key`` (slice 0: the whole of an unsplit one), whole."""
    flat = torch.empty(shape.numel(), dtype=_dtype(info["dtype"]))
    covered = _fill(flat, 0, flat.numel(), info, tp_rank, reader, key)
    if covered != flat.numel():
        raise _Uncovered(f"{key}: the checkpoint's pieces cover {covered} of tp slice {tp_rank}'s {flat.numel()} elements")
    return flat.view(shape)


def _saved_rows(key: str, info: Mapping[str, Any], saved_tp: int, dim: int, rows: range, reader: _Reader) -> torch.Tensor:
    """Rows ``rows`` along ``dim`` of the whole tensor, from the saved slices that overlap them."""
    saved_split = info["tp_mode"] and info["tp_split_dim"] >= 0 and saved_tp > 1
    if not saved_split:
        whole = _saved_slice(key, info, 0, torch.Size(info["shape"]), reader)
        return whole.narrow(dim, rows.start, len(rows))
    local = torch.Size(info["local_shape"])
    per = local[dim]
    parts = []
    for r in range(rows.start // per, (rows.stop - 1) // per + 1):
        a, b = max(rows.start, r * per), min(rows.stop, (r + 1) * per)
        parts.append(_saved_slice(key, info, r, local, reader).narrow(dim, a - r * per, b - a))
    return torch.cat(parts, dim)


def _load_param(key: str, param: DistributedParameter, info: Mapping[str, Any], saved_tp: int,
                reader: _Reader) -> str | None:
    tp = bmt_comm.get_context().comms.tp
    start, end = param._start_partition, param._end_partition
    target = param.data.view(-1)
    split = _tp_split(param, tp.size)
    if info["kind"] == "replicated":
        full = reader.tensor(info["pieces"][0][0], key)
        if param._tp_mode and param._tp_split_dim >= 0:
            size = param._original_shape[param._tp_split_dim]
            full = full.narrow(param._tp_split_dim, tp.rank * size, size)
        target.copy_(full.reshape(-1)[start:end])
        return None
    saved_split = info["tp_mode"] and info["tp_split_dim"] >= 0 and saved_tp > 1
    if saved_split and split and info["tp_split_dim"] != param._tp_split_dim:
        return (
            f"{key}: saved split along dim {info['tp_split_dim']} but the model splits it along dim "
            f"{param._tp_split_dim}; a checkpoint loads only into the same layer layout"
        )
    if saved_split == split and (not split or saved_tp == tp.size):  # the same layout: read the pieces
        covered = _fill(target, start, end, info, tp.rank if split else 0, reader, key)
        if covered != end - start:
            return f"{key}: the checkpoint's pieces cover {covered} of this rank's {end - start} elements"
        return None
    # another tensor-parallel layout: build this tp rank's slice (the whole tensor if unsplit)
    dim = param._tp_split_dim if split else int(info["tp_split_dim"])
    size = param._original_shape[dim]
    first = tp.rank * size if split else 0
    try:
        local = _saved_rows(key, info, saved_tp, dim, range(first, first + size), reader)
    except _Uncovered as ex:
        return str(ex)
    target.copy_(local.reshape(-1)[start:end])
    return None


def _load_plain(key: str, tensor: torch.Tensor, info: Mapping[str, Any], saved_tp: int,
                reader: _Reader) -> str | None:
    if info["kind"] == "replicated":
        tensor.copy_(reader.tensor(info["pieces"][0][0], key))
        return None
    if info["tp_mode"] and info["tp_split_dim"] >= 0 and saved_tp > 1:  # join the saved tp slices
        dim = int(info["tp_split_dim"])
        try:
            tensor.copy_(_saved_rows(key, info, saved_tp, dim, range(tensor.shape[dim]), reader))
        except _Uncovered as ex:
            return str(ex)
        return None
    numel = tensor.numel()
    full = torch.empty(numel, dtype=_dtype(info["dtype"]))
    if _fill(full, 0, numel, info, 0, reader, key) != numel:
        return f"{key}: the checkpoint's pieces do not cover the whole tensor"
    tensor.copy_(full.view(tensor.shape))
    return None


def _overlap(info: Mapping[str, Any], tp_rank: int, start: int, end: int) -> tuple[int, set[int]]:
    """How many of the elements ``[start, end)`` of tp slice ``tp_rank`` the pieces hold, and the
    rank files that hold them."""
    covered, files = 0, set()
    for r, piece_tp, s, e in info["pieces"]:
        if piece_tp == tp_rank and max(s, start) < min(e, end):
            covered += min(e, end) - max(s, start)
            files.add(int(r))
    return covered, files


def _plan_rows(key: str, info: Mapping[str, Any], saved_tp: int, dim: int, rows: range) -> tuple[str | None, set[int]]:
    """``_saved_rows``' reads, checked: every saved slice it joins must be whole."""
    saved_split = info["tp_mode"] and info["tp_split_dim"] >= 0 and saved_tp > 1
    if not saved_split:
        slices, numel = [0], torch.Size(info["shape"]).numel()
    else:
        local = torch.Size(info["local_shape"])
        per = local[dim]
        slices, numel = list(range(rows.start // per, (rows.stop - 1) // per + 1)), local.numel()
    files: set[int] = set()
    for r in slices:
        covered, held = _overlap(info, r, 0, numel)
        if covered != numel:
            return f"{key}: the checkpoint's pieces cover {covered} of tp slice {r}'s {numel} elements", set()
        files |= held
    return None, files


def _plan(key: str, t: torch.Tensor, info: Mapping[str, Any], saved_tp: int) -> tuple[str | None, set[int]]:
    """What loading ``key`` into ``t`` will read (the rank files), or why it can't: the checks of
    ``_load_param``/``_load_plain``, made before anything is copied."""
    if info["kind"] == "replicated":
        return None, {int(info["pieces"][0][0])}
    if not isinstance(t, DistributedParameter):
        if info["tp_mode"] and info["tp_split_dim"] >= 0 and saved_tp > 1:
            dim = int(info["tp_split_dim"])
            return _plan_rows(key, info, saved_tp, dim, range(t.shape[dim]))
        covered, files = _overlap(info, 0, 0, t.numel())
        if covered != t.numel():
            return f"{key}: the checkpoint's pieces do not cover the whole tensor", set()
        return None, files
    tp = bmt_comm.get_context().comms.tp
    start, end = t._start_partition, t._end_partition
    split = _tp_split(t, tp.size)
    saved_split = info["tp_mode"] and info["tp_split_dim"] >= 0 and saved_tp > 1
    if saved_split and split and info["tp_split_dim"] != t._tp_split_dim:
        return (
            f"{key}: saved split along dim {info['tp_split_dim']} but the model splits it along dim "
            f"{t._tp_split_dim}; a checkpoint loads only into the same layer layout"
        ), set()
    if saved_split == split and (not split or saved_tp == tp.size):
        covered, files = _overlap(info, tp.rank if split else 0, start, end)
        if covered != end - start:
            return f"{key}: the checkpoint's pieces cover {covered} of this rank's {end - start} elements", set()
        return None, files
    dim = t._tp_split_dim if split else int(info["tp_split_dim"])
    size = t._original_shape[dim]
    first = tp.rank * size if split else 0
    return _plan_rows(key, info, saved_tp, dim, range(first, first + size))


def _read_checked_metadata(path: str) -> dict[str, Any]:
    """Rank 0: ``metadata.json`` (its own checksum), then every file it names (there, full size)."""
    metadata = read_sharded_metadata(path, FORMAT, VERSIONS)
    check_shard_files(path, metadata)
    return metadata


def load_sharded(model: torch.nn.Module, directory: str | os.PathLike[str], strict: bool = True) -> _IncompatibleKeys:
    """Collective: load a checkpoint written by ``save_sharded`` at any world size.

    Nothing is copied until everything this load needs has been checked, on every rank: the
    files' sizes and checksums, then keys, shapes and each rank's coverage against the model. A
    failure raises the same :class:`CheckpointError` on every rank and leaves the model as it was.
    Missing/unexpected keys and shape mismatches are reported as torch's ``load_state_dict`` does,
    for the whole model on every rank (also where a rank holds a part of it: a pipeline stage).
    """
    check_model_alike(model, "load_sharded")  # a rank with another model fails here, alike everywhere
    bmt_comm.flush_pending_writes()  # a delayed update landing later would overwrite what is loaded
    ctx = bmt_comm.get_context()
    world = ctx.comms.world
    path = os.path.abspath(os.fspath(directory))
    what = f"load_sharded from {path!r}"
    header: tuple[Any, dict[str, Any] | None] | None = None
    error: BaseException | None = None
    if world.rank == 0:
        try:
            header = (None, _read_checked_metadata(path))
        except Exception as ex:
            error = ex
            header = (status_of(ex), None)
    header = bmt_comm.broadcast_object(header, world, 0)
    assert header is not None
    raise_agreed([header[0]], world, what, error)
    metadata = header[1]
    assert metadata is not None
    saved: dict[str, Any] = metadata["tensors"]
    saved_tp: int = metadata["tp_size"]
    entries = state_entries(model)
    errors: list[str] = []
    reads: dict[int, list[str]] = {}
    for e in entries:  # plan: shapes and coverage; the files and tensors this rank will read
        info = saved.get(e.key)
        if info is None:
            continue
        shape = torch.Size(info["shape"])
        expected = _full_shape(e.tensor) if isinstance(e.tensor, DistributedParameter) else e.tensor.shape
        if shape != expected:
            errors.append(
                f"size mismatch for {e.key}: copying a param with shape {shape} from checkpoint, "
                f"the shape in current model is {expected}."
            )
            continue
        message, files = _plan(e.key, e.tensor, info, saved_tp)
        if message is not None:
            errors.append(message)
        for r in files:
            reads.setdefault(r, []).append(e.key)
    saved_extra = metadata.get("extra_state", {"file": EXTRA_STATE_FILE, "keys": []})
    saved_extra_keys = [k for k, _ in saved_extra["keys"]]
    extra_entries = extra_state_entries(model, "set_extra_state")
    values: dict[str, Any] = {}
    failure: BaseException | None = None
    try:  # verify: the bytes of every tensor this rank reads, and the extra state if it needs it
        for r in sorted(reads):
            check_shard(path, metadata, r, reads[r])
        if any(x.key in saved_extra_keys for x in extra_entries):
            check_extra_state(path, metadata)
            values = torch.load(os.path.join(path, saved_extra["file"]), map_location="cpu")
    except Exception as ex:
        failure = ex
    # one all-gather: each rank's failure, its problems (pieces missing for one rank's range), and
    # its keys (a pipeline stage holds its own layers only), so every rank decides alike
    held_keys = [(e.key, e.path) for e in entries] + [(x.key, x.path) for x in extra_entries]
    everyone = bmt_comm.allgather_objects((status_of(failure), errors, held_keys), world)
    raise_agreed([status for status, _, _ in everyone], world, what, failure)
    errors = list(dict.fromkeys(m for _, rank_errors, _ in everyone for m in rank_errors))
    model_keys = merge_keys(keys for _, _, keys in everyone)
    held = set(model_keys)
    in_checkpoint = [*saved, *saved_extra_keys]
    missing = [k for k in model_keys if k not in saved and k not in saved_extra_keys]
    unexpected = [k for k in in_checkpoint if k not in held]
    problems = load_problems(model, missing, unexpected, errors, strict)
    if problems is not None:
        raise CheckpointError(problems)

    reader = _Reader(path, metadata["files"])  # checked: only now is the model written
    try:
        for x in extra_entries:
            if x.key in values:
                x.module.set_extra_state(values[x.key])
        with torch.no_grad():
            for e in entries:
                info = saved.get(e.key)
                if info is None:
                    continue
                if isinstance(e.tensor, DistributedParameter):
                    message = _load_param(e.key, e.tensor, info, saved_tp, reader)
                else:
                    message = _load_plain(e.key, e.tensor, info, saved_tp, reader)
                if message is not None:
                    raise RuntimeError(f"{e.key}: {message} (not found when checking)")
    except Exception as ex:
        failure = ex
    agree(failure, world, what)
    return _IncompatibleKeys(missing, unexpected)
