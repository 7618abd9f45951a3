"""Training checkpoints: one call saves the whole training state, one call restores it.

``save_checkpoint(root, model, optim_manager, step=...)`` writes ``root/step-<step>/`` (model,
every optimizer's state, schedulers, loss scale, every rank's RNG states, the step, user objects)
as a directory that appears whole or not at all, and points ``root/latest`` at it;
``load_checkpoint(root, model, optim_manager)`` restores the latest one, bitwise at the same world
size and re-cut at another ZeRO size.
"""

from ._agree import CheckpointError
from ._files import FORMAT, LATEST_FILE, MANIFEST_FILE, VERSION
from .load import CheckpointInfo, load_checkpoint
from .save import save_checkpoint

__all__ = [
    "FORMAT",
    "LATEST_FILE",
    "MANIFEST_FILE",
    "VERSION",
    "CheckpointError",
    "CheckpointInfo",
    "load_checkpoint",
    "save_checkpoint",
]
