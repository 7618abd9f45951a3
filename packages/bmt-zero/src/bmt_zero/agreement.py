"""Ranks that build one sharded structure together must describe it alike, checked before its
collectives: a flat storage whose ranks disagree on a shape or a dtype would otherwise be built
from mismatched collectives (a crash inside the transport, a hang on NCCL, or silently wrong
shards when the sizes happen to match).

Each rank hashes its description; one all-gather of the 8-byte hashes compares them. Only on a
mismatch do the descriptions themselves travel, so every rank raises the same error, naming the
first entry where two ranks differ. ``check_plans_agree`` applies it to the buffers of a flat
storage about to be built.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

import bmt_comm
import torch
from bmt_comm import Communicator, ReduceOp

from .flat_layout import FlatLayout

if TYPE_CHECKING:
    from .parameter import DistributedParameter

__all__ = ["check_agreement", "check_plans_agree"]


def _digest(description: Sequence[str]) -> int:
    raw = hashlib.blake2b("\n".join(description).encode(), digest_size=8).digest()
    return int.from_bytes(raw, "little", signed=True)


def check_agreement(description: Sequence[str], comm: Communicator, what: str) -> None:
    """Collective over ``comm``: raise ValueError on every rank unless all hold the same ``description``."""
    if comm.size == 1:
        return
    mine = torch.tensor([_digest(description)], dtype=torch.int64, device=comm.device)
    everyone = torch.empty(comm.size, dtype=torch.int64, device=comm.device)
    comm.all_gather(mine, everyone)
    if len(set(everyone.tolist())) == 1:
        return
    described_whats: list[tuple[str, list[str]]] = bmt_comm.allgather_objects((what, list(description)), comm)
    ranks = comm.global_ranks
    whats = [w for w, _ in described_whats]
    described = [d for _, d in described_whats]
    first = described[0]
    other = next(r for r in range(comm.size) if described[r] != first)
    theirs = described[other]
    if whats[other] != whats[0]:  # out of step: the same error on every rank, from both sides
        raise ValueError(
            f"the ranks of group {list(ranks)} are building different things at the same point: rank "
            f"{ranks[0]} builds {whats[0]} ({_entry(first, 0)}) while rank {ranks[other]} builds "
            f"{whats[other]} ({_entry(theirs, 0)}); their models differ in the number or order of Blocks "
            "(build the same layers on every rank)"
        )
    at = next((i for i, (a, b) in enumerate(zip(first, theirs, strict=False)) if a != b), min(len(first), len(theirs)))
    raise ValueError(
        f"{what} must be built alike on every rank of its group (ranks {list(ranks)}), but rank "
        f"{ranks[0]} and rank {ranks[other]} differ at entry {at}: "
        f"{_entry(first, at)} vs {_entry(theirs, at)} "
        f"({len(first)} vs {len(theirs)} entries); build the same modules, shapes and dtypes on every rank"
    )


def _entry(description: Sequence[str], at: int) -> str:
    return repr(description[at]) if at < len(description) else "<nothing>"


def _describe(layout: FlatLayout, params: Sequence[DistributedParameter]) -> list[str]:
    return [
        f"{slot.name}: shape {tuple(slot.shape)}, tp_split_dim {p._tp_split_dim}"
        for slot, p in zip(layout.slots, params, strict=True)
    ]


def check_plans_agree(
    plans: Sequence[tuple[FlatLayout, Sequence[DistributedParameter], Communicator]],
    over: Communicator | None,
    what: str,
    header: Sequence[str] = (),
) -> None:
    """Before any collective of the build: the ranks of ``over`` agree on the buffers (and on the
    parameters of those over ``over`` itself), then each other buffer's group on its parameters."""
    if over is None:
        groups = {c.global_ranks for _, _, c in plans}
        if len(groups) > 1:
            raise ValueError(f"{what} spans {len(groups)} groups: pass agree_over, a group holding them all")
        if not plans:
            return  # nothing to build: no collective follows
        over = plans[0][2]
    head: list[str] = list(header)
    for layout, params, comm in plans:
        head.append(f"buffer {layout.key.name} over {comm.size} ranks")
        if comm.global_ranks == over.global_ranks:
            head += _describe(layout, params)
    check_agreement(head, over, what)
    others = [(layout, params, comm) for layout, params, comm in plans if comm.global_ranks != over.global_ranks]
    if not others:
        return
    error: ValueError | None = None
    for layout, params, comm in others:
        try:
            check_agreement(_describe(layout, params), comm, f"{what} (buffer {layout.key.name})")
        except ValueError as exc:
            error = error or exc
    # every rank of ``over`` learns of a disagreement inside a subgroup, instead of going on alone
    failed = torch.tensor([float(error is not None)], device=over.device)
    over.all_reduce(failed, ReduceOp.MAX)
    if error is not None:
        raise error
    if failed.item():
        raise ValueError(f"{what}: the ranks of another subgroup of {list(over.global_ranks)} disagree (raised there)")
