"""Learning-rate schedules with linear warm-up (BMTrain's ``bmt.lr_scheduler``)."""

from .cosine import Cosine
from .exponential import Exponential
from .linear import Linear
from .no_decay import NoDecay
from .noam import Noam
from .warmup import WarmupLRScheduler

__all__ = ["Cosine", "Exponential", "Linear", "NoDecay", "Noam", "WarmupLRScheduler"]
