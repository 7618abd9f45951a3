"""A model's state-dict tensors on this rank, each with its place in the whole model's key order.

A module whose children live on some ranks only (a pipeline: ``children_everywhere``) holds a
part of the model here; the place of a key (its *path*: the index of each module on the way down,
then ``-1`` and the index among the module's own tensors) is the same on every rank that holds
it, so the ranks' keys merge, sorted by path, into the order ``state_dict`` gives on one rank.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from .gathered import children_everywhere

__all__ = ["EXTRA_STATE_KEY", "KeyedModule", "KeyedTensor", "Path", "extra_state_entries", "merge_keys", "module_entries",
           "state_entries"]

Path = tuple[int, ...]
EXTRA_STATE_KEY = "_extra_state"  # torch's key for a module's get_extra_state()


@dataclass(frozen=True)
class KeyedTensor:
    key: str
    path: Path
    tensor: torch.Tensor


def _walk(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module, Path]]:
    """Every module held on this rank with its name and path (pre-order, duplicates included)."""
    paths: dict[str, Path] = {}
    counts: dict[str, int] = {}  # children of each module met so far (the walk is pre-order)
    spread: dict[str, list[str] | None] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
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
        yield mod_name, module, paths[mod_name]


def _own_tensors(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    own: list[tuple[str, torch.Tensor]] = [(n, p) for n, p in module._parameters.items() if p is not None]
    own += [(n, b) for n, b in module._buffers.items()
            if b is not None and n not in module._non_persistent_buffers_set]
    return own


def state_entries(model: torch.nn.Module) -> list[KeyedTensor]:
    """Parameters and persistent buffers held on this rank under their state-dict keys (a Block
    adds no infix), in model order."""
    out: dict[str, KeyedTensor] = {}
    for mod_name, module, path in _walk(model):
        base = mod_name + "." if mod_name else ""
        for j, (name, tensor) in enumerate(_own_tensors(module)):
            key = base + name
            if key not in out:
                out[key] = KeyedTensor(key, path + (-1, j), tensor)
    return list(out.values())


@dataclass(frozen=True)
class KeyedModule:
    key: str  # "<module>._extra_state"
    path: Path  # after the module's own tensors, as in ``state_dict``
    module: torch.nn.Module


def extra_state_entries(model: torch.nn.Module, hook: str) -> list[KeyedModule]:
    """Modules held on this rank that override ``hook`` (``get_extra_state`` to save,
    ``set_extra_state`` to load), under their ``_extra_state`` keys, in model order."""
    out: dict[str, KeyedModule] = {}
    for mod_name, module, path in _walk(model):
        if getattr(type(module), hook) is getattr(torch.nn.Module, hook):
            continue
        key = (mod_name + "." if mod_name else "") + EXTRA_STATE_KEY
        out.setdefault(key, KeyedModule(key, path + (-1, len(_own_tensors(module))), module))
    return list(out.values())


def merge_keys(ranks: Iterable[Iterable[tuple[str, Path]]]) -> list[str]:
    """Every rank's ``(key, path)`` pairs: the whole model's keys, in model order."""
    merged: dict[str, Path] = {}
    for pairs in ranks:
        for key, path in pairs:
            merged.setdefault(key, tuple(path))
    return sorted(merged, key=lambda k: merged[k])


def module_entries(model: torch.nn.Module) -> list[tuple[str, Path]]:
    """The modules held on this rank, each with its path (the root: ``("", ())``)."""
    return [(name, path) for name, _, path in _walk(model)]
