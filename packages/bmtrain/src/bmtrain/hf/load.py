"""Import a Hugging Face safetensors directory into a sharded model: each rank reads its slices."""

from __future__ import annotations

import math
import os
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import bmt_comm
import torch
from bmt_ckpt import Block
from bmt_zero.parameter import DistributedParameter
from bmt_zero.store import CheckpointError, agree
from bmt_zero.store.model_keys import state_entries
from safetensors import safe_open

from ._files import FileTensor, read_layout
from .keys import IDENTITY, KeyMapping

__all__ = ["load_pretrained", "LoadResult"]


@dataclass(frozen=True)
class LoadResult:
    """Keys left as they were (``strict=False`` only) and file keys nothing took."""

    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Item:
    key: str  # the model's
    file_key: str
    tensor: torch.Tensor  # this rank's: a DistributedParameter (its shard) or a whole tensor
    perm: torch.Tensor | None


def _full_shape(t: torch.Tensor) -> torch.Size:
    if isinstance(t, DistributedParameter):
        return t.tp_original_shape if t.tp_mode else t.original_shape
    return t.shape


def _plan(model: torch.nn.Module, layout: dict[str, FileTensor], mapping: KeyMapping,
          cast: bool) -> tuple[list[_Item], list[str], list[str], set[str]]:
    """What this rank reads; its problems, its missing keys, the file keys it takes."""
    groups: dict[int, list[tuple[str, torch.Tensor]]] = {}
    for e in state_entries(model):
        groups.setdefault(id(e.tensor), []).append((e.key, e.tensor))
    items: list[_Item] = []
    problems: list[str] = []
    missing: list[str] = []
    taken: set[str] = set()
    for names in groups.values():
        tensor = names[0][1]
        found = [(k, mapping.to_file(k)) for k, _ in names]
        present = [(k, fk) for k, fk in found if fk in layout]
        taken.update(fk for _, fk in present)
        if not present:
            alias = "" if len(names) == 1 else f" (tied: {', '.join(k for k, _ in names)})"
            missing.append(f"{found[0][0]} (file key {found[0][1]!r}){alias}")
            continue
        key, file_key = present[0]
        saved, shape = layout[file_key], _full_shape(tensor)
        if saved.shape != shape:
            problems.append(f"{key}: the file's {file_key!r} has shape {tuple(saved.shape)}, the model's is {tuple(shape)}")
            continue
        if saved.dtype != tensor.dtype and not (cast and saved.dtype.is_floating_point and tensor.dtype.is_floating_point):
            problems.append(
                f"{key}: the file's {file_key!r} is {saved.dtype}, the model's is {tensor.dtype} "
                "(pass cast_dtype=True to convert floating-point tensors)"
            )
            continue
        perm = mapping.row_order(key, shape) if len(shape) else None
        items.append(_Item(key, file_key, tensor, perm))
    return items, problems, missing, taken


def _read_shard(item: _Item, handle: Any) -> torch.Tensor | None:
    """This rank's ``[start, end)`` of the flattened (tensor-parallel local) parameter, read as
    the smallest block of whole rows of the file tensor that holds it."""
    param = item.tensor
    assert isinstance(param, DistributedParameter)
    start, end = param.shard_start, param.shard_end
    if end <= start:
        return None
    local = param.original_shape
    if len(local) == 0:
        out: torch.Tensor = handle.get_tensor(item.file_key).reshape(-1)
        return out
    tp = bmt_comm.get_context().comms.tp
    dim = param.tp_split_dim if param.tp_mode and tp.size > 1 else -1
    row_numel = math.prod(local[1:])
    r0, r1 = start // row_numel, -(-end // row_numel)
    rows = torch.arange(r0, r1)
    index: list[slice] = [slice(None)] * len(local)
    if dim == 0:
        rows = rows + tp.rank * local[0]
    elif dim > 0:
        index[dim] = slice(tp.rank * local[dim], (tp.rank + 1) * local[dim])
    if item.perm is not None:
        rows = item.perm[rows]
    lo, hi = int(rows.min()), int(rows.max()) + 1
    index[0] = slice(lo, hi)
    block: torch.Tensor = handle.get_slice(item.file_key)[tuple(index)]
    if item.perm is not None or hi - lo != r1 - r0:
        block = block[rows - lo]
    offset = r0 * row_numel
    return block.reshape(-1)[start - offset : end - offset]


def _read_whole(item: _Item, handle: Any) -> torch.Tensor:
    t: torch.Tensor = handle.get_tensor(item.file_key)
    if item.perm is not None:
        t = t[item.perm]
    return t


def _agreed_problems(problems: list[str], missing: list[str], unexpected: list[str], strict: bool,
                     directory: str) -> None:
    ctx = bmt_comm.get_context()
    everyone = bmt_comm.allgather_objects((problems, missing if strict else []))
    lines: list[str] = []
    for rank_problems, rank_missing in everyone:
        lines += [p for p in rank_problems if p not in lines]
        lines += [f"missing in the checkpoint: {m}" for m in rank_missing if f"missing in the checkpoint: {m}" not in lines]
    if strict:
        lines += [f"unexpected key in the checkpoint: {k!r} (no model key maps to it)" for k in unexpected]
    if lines:
        shown = lines[:20] + ([f"... and {len(lines) - 20} more"] if len(lines) > 20 else [])
        raise CheckpointError(
            f"load_pretrained from {directory}: {len(lines)} problem(s), nothing was loaded "
            f"(world size {ctx.world_size}):\n  " + "\n  ".join(shown)
        )


def load_pretrained(
    model: torch.nn.Module,
    directory: str | os.PathLike[str],
    *,
    key_mapping: KeyMapping | None = None,
    strict: bool = True,
    cast_dtype: bool = False,
) -> LoadResult:
    """Collective: load a Hugging Face safetensors directory (``save_pretrained``'s: an index and
    its files, or one ``model.safetensors``) into ``model``, each rank reading only its slices.

    Before anything is copied, every key of the model (mapped through ``key_mapping`` to the
    file's name) is checked against the files' headers: present, same full shape, same dtype
    (``cast_dtype=True`` converts between floating-point dtypes); with ``strict`` every file key
    must also be used. Problems are gathered from all ranks and raised as one
    :class:`~bmt_zero.store.CheckpointError` on every rank. Tied parameters load from the first
    of their names the file holds. A DistributedParameter reads only the rows that hold its
    shard (of its tensor-parallel slice); other tensors are read whole. Ranks must see the same
    directory.
    """
    bmt_comm.flush_pending_writes()  # a delayed update landing later would overwrite what is loaded
    path = os.fspath(directory)
    mapping = key_mapping or IDENTITY
    ctx = bmt_comm.get_context()
    error: BaseException | None = None
    layout: dict[str, FileTensor] = {}
    try:
        layout = read_layout(path)
    except (OSError, ValueError) as e:
        error = e
    agree(error, ctx.comms.world, f"load_pretrained from {path}")
    items, problems, missing, taken = _plan(model, layout, mapping, cast_dtype)
    taken_anywhere: set[str] = set().union(*bmt_comm.allgather_objects(sorted(taken)))
    unexpected = sorted(set(layout) - taken_anywhere)
    _agreed_problems(problems, missing, unexpected, strict, path)
    with ExitStack() as stack, torch.no_grad():
        handles: dict[str, Any] = {}
        for item in items:
            file = layout[item.file_key].file
            if file not in handles:
                handles[file] = stack.enter_context(safe_open(file, framework="pt"))
            if isinstance(item.tensor, DistributedParameter):
                piece = _read_shard(item, handles[file])
                if piece is not None:
                    item.tensor.data.view(-1).copy_(piece)
            else:
                item.tensor.copy_(_read_whole(item, handles[file]))
    for module in model.modules():
        if isinstance(module, Block):
            module.runtime.shared.release_if_idle()  # a kept gather is stale now
    all_missing = [] if strict else sorted({m for ms in bmt_comm.allgather_objects(missing) for m in ms})
    return LoadResult(all_missing, [] if strict else unexpected)
