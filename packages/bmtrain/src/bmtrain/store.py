"""``bmtrain.store``: gathered checkpoints (``save`` / ``load``) and the helpers clients use.

``save`` writes one file from rank 0 that plain ``torch.load`` reads; ``load`` needs the file on
rank 0 only. ``_save_to_rank0`` is ModelCenter's ``state_dict`` override. New here:
``save_sharded`` / ``load_sharded`` write one file per rank, without gathering, and load at any
world size.
"""

from __future__ import annotations

import os

import torch
from bmt_comm import allgather_objects, broadcast_object
from bmt_zero import store as _store
from bmt_zero.store import (
    DistributedStateDictWrapper,
    DistributedTensorWrapper,
    _save_to_infer_model,
    _save_to_local_rank0,
    _save_to_rank0,
    load_sharded,
    save_sharded,
)
from torch.nn.modules.module import _IncompatibleKeys


def save(model: torch.nn.Module, file_name: str | os.PathLike[str], non_blocking: bool = False) -> None:
    """Gather ``model``'s state dict to rank 0 and write it to ``file_name`` atomically, with its
    checksum manifest (``bmt_zero.store.save``, under 1.0.1's argument names)."""
    _store.save(model, file_name, non_blocking)


def load(model: torch.nn.Module, file_name: str | os.PathLike[str], strict: bool = True) -> _IncompatibleKeys:
    """Load ``file_name`` (needed on rank 0 only) into ``model``, each rank keeping its shards
    (``bmt_zero.store.load``, under 1.0.1's argument names)."""
    return _store.load(model, file_name, strict)

__all__ = [
    "save",
    "load",
    "_save_to_rank0",
    "_save_to_local_rank0",
    "_save_to_infer_model",
    "allgather_objects",
    "broadcast_object",
    "DistributedStateDictWrapper",
    "DistributedTensorWrapper",
    "save_sharded",
    "load_sharded",
]
