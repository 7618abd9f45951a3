"""``bmtrain.lr_scheduler``: warm-up then decay schedules that set the lr on construction."""

from . import cosine, exponential, linear, no_decay, noam, warmup
from .cosine import Cosine
from .exponential import Exponential
from .linear import Linear
from .no_decay import NoDecay
from .noam import Noam
from .warmup import WarmupLRScheduler

__all__ = [
    "WarmupLRScheduler",
    "NoDecay",
    "Noam",
    "Linear",
    "Cosine",
    "Exponential",
    # 1.0.1's module files
    "warmup",
    "no_decay",
    "noam",
    "linear",
    "cosine",
    "exponential",
]
