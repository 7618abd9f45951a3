"""Differentiable collectives (``bmtrain.distributed.ops`` in BMTrain 1.0.1).

``comm=None`` means the world communicator. Unlike the original these also run on CPU tensors
under gloo.
"""

from bmt_comm import all_gather, all_reduce, broadcast, recv_activations, reduce_scatter, send_activations

__all__ = ["all_gather", "all_reduce", "reduce_scatter", "broadcast", "send_activations", "recv_activations"]
