"""Before ``bmt.load`` copies anything: the checkpoint's keys and shapes against the whole model.

Every rank checks the tensors it holds against the entries that rank 0 read; one all-gather
merges what they found and the model's keys (a pipeline stage holds its own layers only), so
every rank raises the same error, torch's message, while the model is still untouched. The keys
are the model's state-dict keys: a module whose ``_load_from_state_dict`` takes other keys
(renamed ones) loads with ``strict=False``.
"""

from __future__ import annotations

import bmt_comm
import torch
from bmt_comm import Communicator

from ..module import _expected_shape, _size_mismatch
from ..parameter import DistributedParameter
from .errors import CheckpointError
from .model_keys import Path, extra_state_entries, merge_keys, module_entries, state_entries
from .report import load_problems
from .view import DistributedStateDictWrapper

__all__ = ["check_against"]


def _local_errors(model: torch.nn.Module, view: DistributedStateDictWrapper) -> list[str]:
    errors = []
    for e in state_entries(model):
        if e.key not in view:
            continue
        got = view.shape_of(e.key)
        if got is None:
            errors.append(f'While copying the parameter named "{e.key}", expected torch.Tensor or Tensor-like '
                          "object from checkpoint but received a non-tensor value")
            continue
        t = e.tensor
        if isinstance(t, DistributedParameter):
            expected = _expected_shape(t)
        else:
            expected = t.shape
            if t.dim() == 0 and got == torch.Size([1]):
                continue  # torch's compatibility rule for 1-element checkpoints of scalars
        if got != expected:
            errors.append(_size_mismatch(e.key, got, expected))
    return errors


def _reporter(key: str, modules: dict[str, Path]) -> Path:
    """The path of the module that reports ``key`` as unexpected: the deepest one on its way."""
    parts = key.split(".")
    for n in range(len(parts) - 1, 0, -1):
        name = ".".join(parts[:n])
        if name in modules:
            return modules[name]
    return ()


def check_against(model: torch.nn.Module, view: DistributedStateDictWrapper, strict: bool,
                  comm: Communicator) -> None:
    """Collective: raise :class:`CheckpointError` (the same on every rank) if loading ``view`` into
    ``model`` would fail: a shape or a non-tensor value, or, under ``strict``, missing/unexpected keys."""
    held: list[tuple[str, Path]] = [(e.key, e.path) for e in state_entries(model)]
    held += [(x.key, x.path) for x in extra_state_entries(model, "set_extra_state")]
    everyone = bmt_comm.allgather_objects((_local_errors(model, view), held, module_entries(model)), comm)
    errors = list(dict.fromkeys(m for rank_errors, _, _ in everyone for m in rank_errors))
    missing: list[str] = []
    unexpected: list[str] = []
    if strict:
        model_keys = merge_keys(keys for _, keys, _ in everyone)
        known = set(model_keys)
        missing = [k for k in model_keys if k not in view]
        modules: dict[str, Path] = {}
        for _, _, mods in everyone:
            for name, path in mods:
                modules.setdefault(name, tuple(path))
        order = {k: i for i, k in enumerate(view)}
        unexpected = sorted((k for k in view if k not in known), key=lambda k: (_reporter(k, modules), order[k]))
    message = load_problems(model, missing, unexpected, errors, strict)
    if message is not None:
        raise CheckpointError(message)
