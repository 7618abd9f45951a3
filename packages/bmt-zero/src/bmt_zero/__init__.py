"""bmt-zero: ZeRO-sharded parameters and modules, flat sharded storage, checkpoints, tensor-parallel layers.

Besides the user-facing names, the public API holds what bmt-ckpt builds Blocks from: the flat
storage (``FlatStorage``, ``BufferState``, ``ReduceHandle``), the cross-rank ``check_agreement``,
state-dict pieces (``load_distributed_param``, ``load_plain_tensor``, ``state_dst``,
``keeps_state``) and ``init_distributed_parameter``. Parameters and flat tensors are
``bmt_comm.Shard``s.
"""

from . import nn
from .agreement import check_agreement
from .flat_storage import BufferState, FlatInfo, FlatStorage, ReduceHandle, flat_info
from .gather import gather_for_state, gather_full, gather_to, keeps_state, state_dst
from .grouping import grouped_parameters
from .init_params import init_distributed_parameter, init_parameters
from .module import BlockType, DistributedModule, load_distributed_param, load_plain_tensor, mark_in_block
from .parameter import DistributedParameter, InitMethod, ParameterInitializer
from .partition import Partition
from .reads import reused_gathers
from .store import load, load_sharded, save, save_sharded, wait_for_save
from .wrapper import make_distributed

__all__ = [
    "BlockType",
    "BufferState",
    "DistributedModule",
    "DistributedParameter",
    "FlatInfo",
    "FlatStorage",
    "InitMethod",
    "ParameterInitializer",
    "Partition",
    "ReduceHandle",
    "check_agreement",
    "flat_info",
    "gather_for_state",
    "gather_full",
    "gather_to",
    "grouped_parameters",
    "init_distributed_parameter",
    "init_parameters",
    "keeps_state",
    "load",
    "load_distributed_param",
    "load_plain_tensor",
    "load_sharded",
    "make_distributed",
    "mark_in_block",
    "nn",
    "reused_gathers",
    "save",
    "state_dst",
    "wait_for_save",
    "save_sharded",
]
