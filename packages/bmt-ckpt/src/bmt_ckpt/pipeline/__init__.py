"""A pipeline's runtime and state: ``pipeline`` (``PipelineTransformerBlockList``), ``_pipe_ops``
(its point-to-point autograd functions), ``_pipe_state`` (its state dicts over the stages) and
``pipe_schedule`` (which layers each stage runs, how a batch splits into micro-batches)."""

from .pipeline import PipelineTransformerBlockList

__all__ = ["PipelineTransformerBlockList"]
