"""Hugging Face's safetensors layout: ``model-0000i-of-0000n.safetensors`` files and the
``model.safetensors.index.json`` that maps every key to its file."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

import torch
from safetensors import safe_open

__all__ = ["INDEX_FILE", "SINGLE_FILE", "CONFIG_FILE", "FileTensor", "parse_size", "plan_shards", "shard_name", "read_layout"]

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"  # what save_pretrained writes when one file holds everything
CONFIG_FILE = "config.json"

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*\Z")

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def parse_size(size: int | str) -> int:
    """``max_shard_size``: bytes, or a string like ``"5GB"`` / ``"500MiB"`` (Hugging Face's units)."""
    if isinstance(size, bool):
        raise TypeError(f"max_shard_size must be an int or a string such as '5GB', got {size!r}")
    if isinstance(size, int):
        value = size
    else:
        m = _SIZE.match(size)
        unit = m.group(2).upper() if m else None
        if m is None or unit not in _UNITS:
            raise ValueError(f"max_shard_size must be bytes or a size such as '5GB' or '500MiB', got {size!r}")
        value = int(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return value


def shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def plan_shards(sizes: list[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """Keys in order, cut into files of at most ``max_bytes`` (a bigger tensor gets a file alone)."""
    files: list[list[str]] = []
    used = 0
    for key, nbytes in sizes:
        if not files or (used + nbytes > max_bytes and files[-1]):
            files.append([])
            used = 0
        files[-1].append(key)
        used += nbytes
    return files or [[]]


@dataclass(frozen=True)
class FileTensor:
    file: str  # path
    shape: torch.Size
    dtype: torch.dtype


def read_layout(directory: str) -> dict[str, FileTensor]:
    """Every tensor of a directory written by ``save_pretrained`` (an index, or one file), from
    the headers only."""
    index = os.path.join(directory, INDEX_FILE)
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: no 'weight_map' object")
        files = sorted(set(weight_map.values()))
    elif os.path.exists(os.path.join(directory, SINGLE_FILE)):
        weight_map, files = None, [SINGLE_FILE]
    else:
        raise FileNotFoundError(f"{directory} holds neither {INDEX_FILE} nor {SINGLE_FILE}")
    out: dict[str, FileTensor] = {}
    for name in files:
        path = os.path.join(directory, name)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}, named in {INDEX_FILE}, does not exist")
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                if weight_map is not None and weight_map.get(key) != name:
                    continue
                sl = f.get_slice(key)
                dtype = _DTYPES.get(sl.get_dtype())
                if dtype is None:
                    raise ValueError(f"{path}: tensor {key!r} has dtype {sl.get_dtype()}, which is not supported")
                out[key] = FileTensor(path, torch.Size(sl.get_shape()), dtype)
    if weight_map is not None:
        lost = sorted(set(weight_map) - set(out))
        if lost:
            raise ValueError(f"{INDEX_FILE} names keys its files do not hold: {lost[:5]}{' ...' if len(lost) > 5 else ''}")
    return out
