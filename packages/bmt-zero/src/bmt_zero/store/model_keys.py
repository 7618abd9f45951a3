"""A model's state-dict tensors on this rank, each with its place in the whole model's key order.

A module whose children live on some ranks only (a pipeline: ``children_everywhere``) holds a
part of the model here; the place of a key (its *path*: the index of each module on the way down,
then ``-1`` and the index among the module's own tensors) is the same on every rank that holds
it, so the ranks' keys merge, sorted by path, into the order ``state_dict`` gives on one rank.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from .gathered import children_everywhere

__all__ = ["Path", "KeyedTensor", "state_entries", "merge_keys"]

Path = tuple[int, ...]


@dataclass(frozen=True)
class KeyedTensor:
    key: str
    path: Path
    tensor: torch.Tensor


def state_entries(model: torch.nn.Module) -> list[KeyedTensor]:
    """Parameters and persistent buffers held on this rank under their state-dict keys (a Block
    adds no infix), in model order."""
    out: dict[str, KeyedTensor] = {}
    modules: dict[str, torch.nn.Module] = {}
    paths: dict[str, Path] = {}
    counts: dict[str, int] = {}  # children of each module met so far (the walk is pre-order)
    spread: dict[str, list[str] | None] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        modules[mod_name] = module
        spread[mod_name] = children_everywhere(module)
        if mod_name:
            parent, _, name = mod_name.rpartition(".")
            everywhere = spread[parent]
            if everywhere is not None:
                index = everywhere.index(name)
            else:
                index = counts.get(parent, 0)
                counts[parent] = index + 1
            paths[mod_name] = paths[parent] + (index,)
        else:
            paths[mod_name] = ()
        base = mod_name + "." if mod_name else ""
        own = [(n, p) for n, p in module._parameters.items() if p is not None]
        own += [(n, b) for n, b in module._buffers.items()
                if b is not None and n not in module._non_persistent_buffers_set]
        for j, (name, tensor) in enumerate(own):
            key = base + name
            if key not in out:
                out[key] = KeyedTensor(key, paths[mod_name] + (-1, j), tensor)
    return list(out.values())


def merge_keys(ranks: Iterable[Iterable[tuple[str, Path]]]) -> list[str]:
    """Every rank's ``(key, path)`` pairs: the whole model's keys, in model order."""
    merged: dict[str, Path] = {}
    for pairs in ranks:
        for key, path in pairs:
            merged.setdefault(key, tuple(path))
    return sorted(merged, key=lambda k: merged[k])
