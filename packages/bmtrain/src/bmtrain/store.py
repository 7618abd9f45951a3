"""``bmtrain.store``: gathered checkpoints (``save`` / ``load``) and the helpers clients use.

``save`` writes one file from rank 0 that plain ``torch.load`` reads; ``load`` needs the file on
rank 0 only. ``_save_to_rank0`` is ModelCenter's ``state_dict`` override. New here:
``save_sharded`` / ``load_sharded`` write one file per rank, without gathering, and load at any
world size.
"""

from bmt_comm import allgather_objects, broadcast_object
from bmt_zero.store import (
    DistributedStateDictWrapper,
    DistributedTensorWrapper,
    _save_to_infer_model,
    _save_to_local_rank0,
    _save_to_rank0,
    load,
    load_sharded,
    save,
    save_sharded,
)

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
