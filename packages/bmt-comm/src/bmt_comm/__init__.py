"""bmt-comm: process topology, communicators (NCCL loaded at run time, or torch.distributed),
CUDA streams and differentiable collectives for BMTrain."""

from .collectives import all_gather, all_reduce, broadcast, recv_activations, reduce_scatter, send_activations
from .communicator import Backend, Communicator, ReduceOp
from .config import ConfigView, config
from .context import Communicators, DistContext, ProcessState, get_context, is_initialized, process_state
from .grad_ready import (
    GradReady,
    HookHandle,
    flush_pending_writes,
    has_grad_ready_hooks,
    has_param_waits,
    notify_grad_ready,
    register_grad_ready_hook,
    register_param_wait,
    register_pending_writes,
    wait_param_writes,
)
from .init import destroy, init_distributed
from .objects import allgather_objects, broadcast_object
from .shard import Shard, check_shard, mark_shard
from .streams import Streams, current_stream, record_stream, stream_context, wait_stream
from .sync import gather_result, sum_loss, synchronize, wait_loader
from .timeouts import CollectiveError
from .topology import GroupKind, Topology
from .torch_communicator import TorchCommunicator
from .utils import (
    AverageRecorder,
    print_block,
    print_dict,
    print_rank,
    rank,
    round_up,
    see_memory,
    world_size,
)

__all__ = [
    "AverageRecorder",
    "Backend",
    "CollectiveError",
    "Communicator",
    "Communicators",
    "ConfigView",
    "DistContext",
    "GradReady",
    "GroupKind",
    "HookHandle",
    "ReduceOp",
    "Shard",
    "Streams",
    "Topology",
    "TorchCommunicator",
    "all_gather",
    "all_reduce",
    "allgather_objects",
    "broadcast",
    "broadcast_object",
    "check_shard",
    "config",
    "current_stream",
    "destroy",
    "flush_pending_writes",
    "gather_result",
    "get_context",
    "process_state",
    "ProcessState",
    "has_grad_ready_hooks",
    "has_param_waits",
    "init_distributed",
    "is_initialized",
    "mark_shard",
    "notify_grad_ready",
    "print_block",
    "print_dict",
    "print_rank",
    "rank",
    "record_stream",
    "recv_activations",
    "register_grad_ready_hook",
    "register_param_wait",
    "register_pending_writes",
    "wait_param_writes",
    "reduce_scatter",
    "round_up",
    "see_memory",
    "send_activations",
    "stream_context",
    "sum_loss",
    "synchronize",
    "wait_loader",
    "wait_stream",
    "world_size",
]
