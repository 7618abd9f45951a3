"""``bmt_ckpt.pipe_schedule``: kept as a path; the module is ``bmt_ckpt.pipeline.pipe_schedule``."""

from .pipeline.pipe_schedule import MicroBatches, StagePartition

__all__ = ["MicroBatches", "StagePartition"]
