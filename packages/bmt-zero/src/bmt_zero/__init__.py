"""bmt-zero: ZeRO-sharded parameters and modules, flat sharded storage, checkpoints, tensor-parallel layers."""

from . import nn
from .flat_storage import FlatStorage
from .gather import gather_for_state, gather_full, gather_to
from .grouping import grouped_parameters
from .init_params import init_parameters
from .module import BlockType, DistributedModule
from .parameter import DistributedParameter, InitMethod, ParameterInitializer
from .partition import Partition
from .reads import reused_gathers
from .store import load, load_sharded, save, save_sharded, wait_for_save
from .wrapper import make_distributed

__all__ = [
    "BlockType",
    "DistributedModule",
    "DistributedParameter",
    "FlatStorage",
    "InitMethod",
    "ParameterInitializer",
    "Partition",
    "gather_for_state",
    "gather_full",
    "gather_to",
    "grouped_parameters",
    "init_parameters",
    "load",
    "load_sharded",
    "make_distributed",
    "nn",
    "reused_gathers",
    "save",
    "wait_for_save",
    "save_sharded",
]
