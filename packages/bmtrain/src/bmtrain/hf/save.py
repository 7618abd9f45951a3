"""Export a (sharded, tensor- or pipeline-parallel) model as a Hugging Face safetensors directory."""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Mapping
from typing import Any, BinaryIO

import bmt_comm
import torch
from bmt_zero.store import agree
from bmt_zero.store.atomic import atomic_write, replace_dir
from bmt_zero.store.gathered import _save_to_rank0
from safetensors.torch import save as safetensors_bytes

from ._files import CONFIG_FILE, INDEX_FILE, parse_size, plan_shards, shard_name
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


def _file_tensors(state: Mapping[str, Any], skip: set[str], mapping: KeyMapping,
                  dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key in skip:
            continue
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"state entry {key!r} is a {type(value).__name__}, not a tensor: safetensors holds tensors only")
        tensor = value.detach().cpu()
        perm = mapping.row_order(key, tensor.shape) if tensor.dim() else None
        if perm is not None:
            tensor = tensor[torch.argsort(perm)]  # file[perm[i]] = model[i]
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        name = mapping.to_file(key)
        if name in out:
            raise ValueError(f"two model keys map to the checkpoint key {name!r} (the second: {key!r})")
        out[name] = tensor
    return out


def _write_bytes(path: str, data: bytes) -> None:
    def write(f: BinaryIO) -> None:
        f.write(data)

    atomic_write(path, write)


def _write(directory: str, tensors: dict[str, torch.Tensor], max_bytes: int, config: Any) -> None:
    final = os.path.abspath(directory)
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(final)}.tmp-{secrets.token_hex(8)}")
    os.makedirs(tmp)
    try:
        sizes = [(k, t.numel() * t.element_size()) for k, t in tensors.items()]
        files = plan_shards(sizes, max_bytes)
        weight_map: dict[str, str] = {}
        for i, keys in enumerate(files):
            name = shard_name(i, len(files))
            # contiguous copies: safetensors refuses views and tensors that share memory
            data = safetensors_bytes({k: tensors[k].contiguous().clone() for k in keys}, metadata={"format": "pt"})
            _write_bytes(os.path.join(tmp, name), data)
            weight_map.update(dict.fromkeys(keys, name))
        index = {"metadata": {"total_size": sum(n for _, n in sizes)}, "weight_map": weight_map}
        index_text = json.dumps(index, indent=2, sort_keys=True) + "\n"
        _write_bytes(os.path.join(tmp, INDEX_FILE), index_text.encode())
        if config is not None:
            text = json.dumps(config, indent=2) + "\n" if isinstance(config, dict) else config.to_json_string()
            _write_bytes(os.path.join(tmp, CONFIG_FILE), text.encode())
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
    each (``"5GB"``, ``"500MiB"`` or an int; a larger tensor gets a file of its own), the
    ``model.safetensors.index.json`` that names every key's file, and ``config.json`` from
    ``config`` (a ``PretrainedConfig`` or a dict; default: ``model.config`` when the model came
    from transformers). ``key_mapping`` renames (and reorders) model keys to the file's; tied
    parameters are written once, under their first name; ``dtype`` casts floating tensors. The
    directory appears complete or not at all (written under a temporary name, then renamed); an
    existing one is replaced. A failure on rank 0 is raised on every rank.
    """
    ctx = bmt_comm.get_context()
    max_bytes = parse_size(max_shard_size)
    mapping = key_mapping or IDENTITY
    aliases: set[str] = set().union(*bmt_comm.allgather_objects(sorted(tied_aliases(model))))
    state = _save_to_rank0(model)
    error: BaseException | None = None
    if ctx.rank == 0:
        try:
            tensors = _file_tensors(state, aliases, mapping, dtype)
            del state
            _write(os.fspath(directory), tensors, max_bytes, _hf_config(model, config))
        except BaseException as e:  # noqa: BLE001 - every rank raises it below
            error = e
    agree(error, ctx.comms.world, f"save_pretrained to {os.fspath(directory)}")
