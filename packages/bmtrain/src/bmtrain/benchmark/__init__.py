"""``bmtrain.benchmark``: bandwidth of the collectives over message sizes (import explicitly).

Run on every rank after ``bmt.init_distributed()``, e.g. ``torchrun --nproc_per_node=8 -m
bmtrain.benchmark``. NCCL on GPUs (2**10 .. 2**32 bytes), gloo on CPU (2**10 .. 2**24 bytes).
Each function prints one line per size on rank 0 and returns the measurements.
"""

from . import shape, utils
from .all_gather import all_gather
from .reduce_scatter import reduce_scatter
from .send_recv import send_recv
from .timing import Measurement

__all__ = ["all_gather", "reduce_scatter", "send_recv", "Measurement", "shape", "utils"]
