"""Export a (sharded, tensor- or pipeline-parallel) model as a Hugging Face safetensors directory."""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, BinaryIO

import bmt_comm
import torch
from bmt_zero.store import agree
from bmt_zero.store.atomic import atomic_write, replace_dir
from bmt_zero.store.gathered import _save_to_rank0
from safetensors.torch import save as safetensors_bytes

from ._files import CONFIG_FILE, INDEX_FILE, parse_size, shard_name
from .keys import IDENTITY, KeyMapping

__all__ = ["save_pretrained", "tied_aliases"]


def tied_aliases(model: torch.nn.Module) -> set[str]:
    """Keys of this rank's parameters that repeat an earlier key's tensor (``lm_head.weight`` tied
    to the embedding): Hugging Face writes a tied tensor once and ties it again on load."""
    seen: set[int] = set()
    aliases: set[str] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            aliases.add(name)
        seen.add(id(p))
    return aliases


def _hf_config(model: torch.nn.Module, config: Any) -> Any:
    if config is None:
        config = getattr(model, "config", None)
        if config is None or not hasattr(config, "to_json_string"):
            return None
    if isinstance(config, Mapping):
        return dict(config)
    if not hasattr(config, "to_json_string"):
        raise TypeError(f"config must be a transformers PretrainedConfig or a dict, got {type(config).__name__}")
    return config


def _file_tensor(key: str, value: Any, mapping: KeyMapping, dtype: torch.dtype | None) -> tuple[str, torch.Tensor]:
    """A state entry as the file holds it: its file key, on CPU, rows reordered, cast."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"state entry {key!r} is a {type(value).__name__}, not a tensor: safetensors holds tensors only")
    tensor = value.detach().cpu()
    perm = mapping.row_order(key, tensor.shape) if tensor.dim() else None
    if perm is not None:
        tensor = tensor[torch.argsort(perm)]  # file[perm[i]] = model[i]
    if dtype is not None and tensor.is_floating_point():
        tensor = tensor.to(dtype)
    return mapping.to_file(key), tensor


def _write_bytes(path: str, data: bytes) -> None:
    def write(f: BinaryIO) -> None:
        f.write(data)

    atomic_write(path, write)


class _StreamedFiles(OrderedDict[str, Any]):
    """Rank 0's state dict, written out while it is collected: entries pile up in the current
    file until the next one would pass ``max_bytes``; then that file is written (under a
    temporary name: the final names carry the file count) and let go. Rank 0 never holds more
    than one file's tensors (the 1.0.1 way, and this one's until now, held the whole model).

    A failing entry is kept in ``error`` and the walk goes on (without writing), so rank 0 still
    takes part in every later gather; the caller raises it on every rank at the end."""

    def __init__(self, tmp: str, skip: set[str], mapping: KeyMapping, dtype: torch.dtype | None,
                 max_bytes: int) -> None:
        super().__init__()
        self._metadata: OrderedDict[str, Any] = OrderedDict()  # what a state dict carries; not written
        self.tmp, self.skip, self.mapping, self.dtype, self.max_bytes = tmp, skip, mapping, dtype, max_bytes
        self.pending: dict[str, torch.Tensor] = {}  # the current file's tensors, by file key
        self.pending_bytes = 0
        self.files: list[list[str]] = []  # the file keys of each written file, in order
        self.total_bytes = 0
        self.error: BaseException | None = None

    def __setitem__(self, key: str, value: Any) -> None:
        if self.error is not None or key in self.skip:
            return
        try:
            name, tensor = _file_tensor(key, value, self.mapping, self.dtype)
            if name in self.pending or any(name in keys for keys in self.files):
                raise ValueError(f"two model keys map to the checkpoint key {name!r} (the second: {key!r})")
            nbytes = tensor.numel() * tensor.element_size()
            if self.pending and self.pending_bytes + nbytes > self.max_bytes:
                self.flush()
            self.pending[name] = tensor
            self.pending_bytes += nbytes
            self.total_bytes += nbytes
        except Exception as e:  # noqa: BLE001 - raised on every rank once the walk is over
            self.error = e

    def flush(self) -> None:
        """Write the current file (an empty one when nothing was written yet: a model without tensors)."""
        if not self.pending and self.files:
            return
        # contiguous copies: safetensors refuses views and tensors that share memory
        data = safetensors_bytes({k: t.contiguous().clone() for k, t in self.pending.items()}, metadata={"format": "pt"})
        _write_bytes(os.path.join(self.tmp, f".part-{len(self.files)}"), data)
        self.files.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def finish(self, config: Any) -> None:
        """The last file, the final file names, the index and ``config.json``."""
        self.flush()
        weight_map: dict[str, str] = {}
        for i, keys in enumerate(self.files):
            name = shard_name(i, len(self.files))
            os.replace(os.path.join(self.tmp, f".part-{i}"), os.path.join(self.tmp, name))
            weight_map.update(dict.fromkeys(keys, name))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        _write_bytes(os.path.join(self.tmp, INDEX_FILE), (json.dumps(index, indent=2, sort_keys=True) + "\n").encode())
        if config is not None:
            text = json.dumps(config, indent=2) + "\n" if isinstance(config, dict) else config.to_json_string()
            _write_bytes(os.path.join(self.tmp, CONFIG_FILE), text.encode())


def _has_state_dict_hooks(model: torch.nn.Module) -> bool:
    """A state-dict post-hook may change entries after they are set: such a model is collected
    whole first, then written."""
    return any(m._state_dict_hooks for m in model.modules())


def save_pretrained(
    model: torch.nn.Module,
    directory: str | os.PathLike[str],
    *,
    max_shard_size: int | str = "5GB",
    key_mapping: KeyMapping | None = None,
    config: Any = None,
    dtype: torch.dtype | None = None,
) -> None:
    """Collective: write ``model`` as ``directory`` in Hugging Face's layout, which
    ``transformers.AutoModelForCausalLM.from_pretrained`` loads.

    Each parameter is gathered straight to rank 0 (zero shards, tensor-parallel slices and
    pipeline stages joined), which writes safetensors files of at most ``max_shard_size`` bytes
    each (``"5GB"``, ``"500MiB"`` or an int; a larger tensor gets a file of its own) as the
    tensors arrive, so it holds one file's tensors at a time, never the whole model; then the
    ``model.safetensors.index.json`` that names every key's file, and ``config.json`` from
    ``config`` (a ``PretrainedConfig`` or a dict; default: ``model.config`` when the model came
    from transformers). ``key_mapping`` renames (and reorders) model keys to the file's; tied
    parameters are written once, under their first name; ``dtype`` casts floating tensors. The
    directory appears complete or not at all (written under a temporary name, then renamed); an
    existing one is replaced. A failure on rank 0 is raised on every rank.
    """
    bmt_comm.flush_pending_writes()  # a delayed optimizer update in flight lands before the values are read
    ctx = bmt_comm.get_context()
    max_bytes = parse_size(max_shard_size)
    mapping = key_mapping or IDENTITY
    aliases: set[str] = set().union(*bmt_comm.allgather_objects(sorted(tied_aliases(model))))
    final = os.path.abspath(os.fspath(directory))
    streamed: _StreamedFiles | None = None
    error: BaseException | None = None
    if ctx.rank == 0:
        try:
            os.makedirs(os.path.dirname(final), exist_ok=True)
            tmp = os.path.join(os.path.dirname(final), f".{os.path.basename(final)}.tmp-{secrets.token_hex(8)}")
            os.makedirs(tmp)
            streamed = _StreamedFiles(tmp, aliases, mapping, dtype, max_bytes)
        except BaseException as e:  # noqa: BLE001 - every rank raises it below, after the walk
            error = e
    try:
        # the walk's own errors (a collective's, a model check's) reach every rank as they are
        if streamed is not None and _has_state_dict_hooks(model):
            for key, value in _save_to_rank0(model).items():  # whole first, then written
                streamed[key] = value
        else:
            _save_to_rank0(model, streamed)  # other ranks (and a failed rank 0) collect nothing
        if streamed is not None:
            error = streamed.error
            if error is None:
                try:
                    streamed.finish(_hf_config(model, config))
                    replace_dir(streamed.tmp, final)
                except BaseException as e:  # noqa: BLE001 - every rank raises it below
                    error = e
    finally:
        if streamed is not None and os.path.isdir(streamed.tmp):
            shutil.rmtree(streamed.tmp, ignore_errors=True)
    agree(error, ctx.comms.world, f"save_pretrained to {os.fspath(directory)}")
