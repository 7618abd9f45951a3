"""``bmtrain.global_var``: the ``config`` mapping and ``rank()`` / ``world_size()``.

``config`` is a read-only view of bmt-comm's context with BMTrain 1.0.1's keys; before
``init_distributed`` it is ``{"rank": 0, "local_rank": 0, "world_size": 1, "initialized": False}``.
Only ``config["save_param_to_cpu"]`` may be assigned.
"""

from bmt_comm import config, rank, world_size

__all__ = ["config", "rank", "world_size"]
