"""``Shard``: the public contract between a tensor that holds one rank's piece of a larger tensor
(bmt-zero's ``DistributedParameter`` and flat storage tensors) and the code that must know it
(bmt-optim's gathered optimizer state and its gradient-norm clipping).

A tensor ``t`` that is a ``Shard`` holds elements ``[t.shard_start, t.shard_end)`` of the
flattened whole tensor of ``t.whole_numel`` elements, so ``t.numel() == shard_end - shard_start``.
The other pieces lie on the other ranks of ``t.shard_comm``, in rank order, and no rank outside
that communicator holds any of them: summing a per-element quantity over the whole world counts
every element of the whole tensor exactly once (per pipeline stage that owns it). Any tensor
that is not a ``Shard`` is whole: every rank of its pipeline stage holds all of it.

The names carry a ``shard_`` / ``whole_`` prefix because the implementers are tensors, which
already have ``numel()``. A tensor of one's own can join by carrying the four attributes (see
``mark_shard``); ``isinstance(t, Shard)`` is how the consumers ask.
"""

from __future__ import annotations

from typing import Protocol, TypeVar, runtime_checkable

import torch

from .communicator import Communicator

__all__ = ["Shard", "check_shard", "mark_shard"]

T = TypeVar("T", bound=torch.Tensor)


@runtime_checkable
class Shard(Protocol):
    """One rank's contiguous piece of a flattened whole tensor, sharded over ``shard_comm``."""

    @property
    def shard_start(self) -> int:
        """First element of the flattened whole tensor held here."""
        ...

    @property
    def shard_end(self) -> int:
        """One past the last element held here (``== shard_start`` for an empty piece)."""
        ...

    @property
    def whole_numel(self) -> int:
        """Elements of the whole (flattened) tensor that the pieces of all ranks make up."""
        ...

    @property
    def shard_comm(self) -> Communicator:
        """The ranks holding the pieces, in order: the group to gather them over."""
        ...


def check_shard(t: torch.Tensor) -> Shard | None:
    """``t`` as a ``Shard`` (its ranges checked), or None when ``t`` is whole."""
    if not isinstance(t, Shard):
        return None
    start, end, whole = t.shard_start, t.shard_end, t.whole_numel
    if not 0 <= start <= end <= whole or end - start != t.numel():
        raise ValueError(
            f"inconsistent shard: [{start}, {end}) of {whole} elements, but the tensor has {t.numel()}"
        )
    return t


def mark_shard(t: T, start: int, end: int, whole_numel: int, comm: Communicator) -> T:
    """Make a plain tensor a ``Shard`` (in place, returned): it holds ``[start, end)`` of a whole
    tensor of ``whole_numel`` elements whose pieces lie on the ranks of ``comm``."""
    if not 0 <= start <= end <= whole_numel or end - start != t.numel():
        raise ValueError(
            f"a shard must hold [start, end) with 0 <= start <= end <= whole_numel and end - start == "
            f"t.numel(); got [{start}, {end}) of {whole_numel} for a tensor of {t.numel()} elements"
        )
    t.shard_start = start  # type: ignore[attr-defined]
    t.shard_end = end  # type: ignore[attr-defined]
    t.whole_numel = whole_numel  # type: ignore[attr-defined]
    t.shard_comm = comm  # type: ignore[attr-defined]
    return t
