"""``bmtrain.distributed``: differentiable collectives over a communicator (the world by default)."""

from .ops import all_gather, all_reduce, broadcast, recv_activations, reduce_scatter, send_activations

__all__ = ["all_gather", "all_reduce", "reduce_scatter", "broadcast", "send_activations", "recv_activations"]
