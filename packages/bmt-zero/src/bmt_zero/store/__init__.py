"""Checkpoints: one full file readable by plain ``torch.load`` (``save``/``load``), or one
safetensors file per rank that loads at any world size (``save_sharded``/``load_sharded``).

Every file carries sizes and checksums; loads check them, then the keys and shapes, before
anything is copied, and raise the same :class:`CheckpointError` on every rank when they fail."""

from bmt_comm import allgather_objects, broadcast_object

from .atomic import atomic_write
from .errors import CheckpointError, agree
from .gathered import _save_to_local_rank0, _save_to_rank0, load, load_state_into, save, wait_for_save
from .infer import _save_to_infer_model
from .sharded import load_sharded, save_sharded
from .verify import VerifiedCheckpoint, verify_checkpoint
from .view import DistributedStateDictWrapper, DistributedTensorWrapper

__all__ = [
    "CheckpointError",
    "DistributedStateDictWrapper",
    "DistributedTensorWrapper",
    "_save_to_infer_model",
    "_save_to_local_rank0",
    "_save_to_rank0",
    "agree",
    "allgather_objects",
    "atomic_write",
    "broadcast_object",
    "load",
    "load_sharded",
    "load_state_into",
    "save",
    "save_sharded",
    "VerifiedCheckpoint",
    "verify_checkpoint",
    "wait_for_save",
]
