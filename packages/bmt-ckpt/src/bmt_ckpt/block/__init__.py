"""One Block's runtime and state: ``block`` (the module users build), ``runtime`` (when its
parameters are gathered, prefetched and released), ``checkpointing`` (the autograd function that
runs it) and ``state`` (its state dict and parameter initialisation)."""

from .block import Block, BlockMode

__all__ = ["Block", "BlockMode"]
