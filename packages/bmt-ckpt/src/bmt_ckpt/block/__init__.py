"""One Block's runtime and state: ``block`` (the module users build), ``runtime`` (its phase,
when its parameters are gathered and released, its neighbours), ``scheduler`` (the bmt context's
prefetch, in-flight reduce-scatters and end-of-backward callback, shared by every Block),
``checkpointing`` (the autograd function that runs it) and ``state`` (its state dict and
parameter initialisation)."""

from .block import Block, BlockMode

__all__ = ["Block", "BlockMode"]
