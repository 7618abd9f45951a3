"""BMTrain 1.0.1's API, ``import bmtrain as bmt``, over bmt-comm, bmt-zero, bmt-ckpt and bmt-optim.

``bmtrain.benchmark`` and ``bmtrain.examples`` are imported explicitly.
"""

from . import (
    block_layer,
    checkpoint,
    debug,
    distributed,
    global_var,
    init,
    inspect,
    layer,
    loss,
    lr_scheduler,
    nccl,
    nn,
    optim,
    param_init,
    parameter,
    pipe_layer,
    store,
    utils,
    wrapper,
)
from .block_layer import Block, CheckpointBlock, TransformerBlockList
from .checkpoint import CheckpointError, CheckpointInfo, load_checkpoint, save_checkpoint
from .global_var import config, rank, world_size
from .init import init_distributed, is_initialized
from .layer import DistributedModule
from .param_init import grouped_parameters, init_parameters
from .parameter import DistributedParameter, ParameterInitializer
from .pipe_layer import PipelineTransformerBlockList
from .store import load, save
from .synchronize import (  # the function shadows the module, as in 1.0.1
    gather_result,
    sum_loss,
    synchronize,
    wait_loader,
)
from .utils import load_nccl_pypi, print_block, print_dict, print_rank, see_memory
from .wrapper import BMTrainModelWrapper

__version__ = "1.0.1"

__all__ = [
    # functions and classes
    "init_distributed",
    "is_initialized",
    "config",
    "rank",
    "world_size",
    "DistributedParameter",
    "ParameterInitializer",
    "DistributedModule",
    "init_parameters",
    "grouped_parameters",
    "synchronize",
    "sum_loss",
    "wait_loader",
    "gather_result",
    "Block",
    "CheckpointBlock",
    "TransformerBlockList",
    "PipelineTransformerBlockList",
    "BMTrainModelWrapper",
    "save",
    "load",
    "print_block",
    "print_dict",
    "print_rank",
    "see_memory",
    "load_nccl_pypi",
    # training checkpoints (new: not in 1.0.1)
    "save_checkpoint",
    "load_checkpoint",
    "CheckpointInfo",
    "CheckpointError",
    # sub-modules
    "block_layer",
    "checkpoint",
    "debug",
    "distributed",
    "global_var",
    "init",
    "inspect",
    "layer",
    "loss",
    "lr_scheduler",
    "nccl",
    "nn",
    "optim",
    "param_init",
    "parameter",
    "pipe_layer",
    "store",
    "utils",
    "wrapper",
]
