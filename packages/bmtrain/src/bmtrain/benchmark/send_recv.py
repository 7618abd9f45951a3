"""BMTrain 1.0.1's ``bmtrain.benchmark.send_recv``."""

from ._ops import send_recv

__all__ = ["send_recv"]
