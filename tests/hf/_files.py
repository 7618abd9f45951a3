"""Writing and reading safetensors directories in the tests with safetensors alone (independent
of the code under test)."""

from __future__ import annotations

import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file


def write_dir(tensors: dict[str, torch.Tensor], directory: str, files: int = 2) -> None:
    """``tensors`` in Hugging Face's layout: ``files`` safetensors files and the index."""
    os.makedirs(directory, exist_ok=True)
    keys = list(tensors)
    weight_map = {}
    for i in range(files):
        name = f"model-{i + 1:05d}-of-{files:05d}.safetensors"
        part = keys[i::files]
        save_file({k: tensors[k].contiguous() for k in part}, os.path.join(directory, name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def read_dir(directory: str) -> dict[str, torch.Tensor]:
    """Every tensor of a directory, through its index (or its single file)."""
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
    else:
        with safe_open(os.path.join(directory, "model.safetensors"), framework="pt") as f:
            weight_map = dict.fromkeys(f.keys(), "model.safetensors")
    out = {}
    for name in sorted(set(weight_map.values())):
        with safe_open(os.path.join(directory, name), framework="pt") as f:
            for key in f.keys():
                assert weight_map[key] == name, f"{key} is in {name} but the index says {weight_map[key]}"
                out[key] = f.get_tensor(key)
    assert set(out) == set(weight_map), sorted(set(weight_map) ^ set(out))
    return out
