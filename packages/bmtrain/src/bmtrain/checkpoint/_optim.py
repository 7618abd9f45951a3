"""Optimizer, OptimManager and scheduler states: what each rank saves, and re-cutting them.

Each rank saves its own optimizer state as ``state_dict()`` returns it: the state of this rank's
shards (ZeRO parameters are shards), nothing gathered. With it, the *layout*: for each parameter,
the range ``[start, end)`` of the whole flattened parameter that this rank held. Loading at the
same layout hands the saved state back unchanged (bitwise). At another ZeRO size, each rank
builds the state of its new range from the saved pieces that overlap it, reading only those
(the files are memory-mapped), so no rank ever holds the whole optimizer state.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from bmt_comm import check_shard
from bmt_optim import OptimManager
from bmt_optim._adam_base import STATE_TENSORS, AdamBase
from bmt_zero import flat_info

__all__ = ["Entry", "Piece", "Source", "TrainState", "layout_of", "plan_recut", "recut_state", "resolve", "to_cpu"]

_PER_RANK_KEYS = ("_delta_info",)  # statistics of this rank's last update: meaningless once re-cut


class Entry(NamedTuple):
    """Where one parameter's state lived on one rank."""

    start: int
    end: int
    numel: int  # of the whole (flattened, tp-local) parameter
    tp_mode: bool  # a tensor-parallel parameter: its pieces are those of the same tp rank
    sharded: bool  # False: every rank holds the whole parameter (and its own state of it)
    # a flat buffer's shard: the elements of the whole that hold parameters (the rest is padding to
    # the group size, so ``numel`` differs between sizes while this does not); None: no padding
    content: int | None = None


class Piece(NamedTuple):
    """Saved elements ``[start, end)`` of a parameter, in the file of old rank ``rank``."""

    rank: int
    start: int
    end: int


def layout_of(opt: torch.optim.Optimizer, legacy: bool = False) -> list[Entry]:
    """Each parameter's range, read through the ``bmt_comm.Shard`` protocol (a ZeRO parameter, or a
    Block's flat shard from ``grouped_parameters``). ``legacy``: the layout that checkpoints before
    flat shards were recognised recorded (a flat shard as a whole tensor), to load those at the
    same layout."""
    out = []
    for group in opt.param_groups:
        for p in group["params"]:
            flat = flat_info(p)
            sh = check_shard(p)
            if sh is None or (legacy and flat is not None):
                out.append(Entry(0, p.numel(), p.numel(), bool(getattr(p, "tp_mode", False)), False))
            elif flat is not None:
                out.append(Entry(sh.shard_start, sh.shard_end, sh.whole_numel, flat.tp_mode, True, flat.content))
            else:
                out.append(Entry(sh.shard_start, sh.shard_end, sh.whole_numel, bool(getattr(p, "tp_mode", False)), True))
    return out


@dataclass(frozen=True)
class TrainState:
    """The optimizer side of a checkpoint: an OptimManager (its optimizers and schedulers) or
    plain optimizers, plus schedulers the manager does not hold."""

    manager: OptimManager | None
    optimizers: list[torch.optim.Optimizer]
    schedulers: list[Any]

    def payload(self) -> dict[str, Any]:
        """This rank's file: every state tensor on the CPU, sharded as the optimizers hold it."""
        manager = None
        if self.manager is not None:
            manager = {k: v for k, v in self.manager.state_dict().items() if k != "optimizers"}
        return {
            "optimizers": [to_cpu(o.state_dict()) for o in self.optimizers],
            "manager": manager,
            "lr_schedulers": [s.state_dict() for s in self.schedulers],
        }

    def describe(self) -> dict[str, Any]:
        """What the manifest records so a load can say what does not match."""
        return {"manager": self.manager is not None, "optimizers": [type(o).__name__ for o in self.optimizers],
                "lr_schedulers": len(self.schedulers)}


def resolve(optimizer: Any, lr_scheduler: Any) -> TrainState:
    """``optimizer``: None, an optimizer, a sequence of them, or an OptimManager;
    ``lr_scheduler``: None, a scheduler or a sequence (those not added to the manager)."""
    scheds = [] if lr_scheduler is None else list(lr_scheduler) if isinstance(lr_scheduler, Sequence) else [lr_scheduler]
    for s in scheds:
        if not (callable(getattr(s, "state_dict", None)) and callable(getattr(s, "load_state_dict", None))):
            raise TypeError(f"lr_scheduler must have state_dict() and load_state_dict(), got {type(s).__name__}")
    if optimizer is None:
        return TrainState(None, [], scheds)
    if isinstance(optimizer, OptimManager):
        return TrainState(optimizer, list(optimizer.optimizers), scheds)
    opts = list(optimizer) if isinstance(optimizer, Sequence) else [optimizer]
    for o in opts:
        if not isinstance(o, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer, a sequence of them or an OptimManager, "
                f"got {type(o).__name__}"
            )
    return TrainState(None, opts, scheds)


def to_cpu(obj: Any) -> Any:
    """``obj`` with every tensor in it on the CPU (CPU tensors are not copied: torch.save reads
    them at once)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach() if obj.device.type == "cpu" else obj.detach().to("cpu")
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_cpu(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(to_cpu(v) for v in obj)
    return obj


class Source(NamedTuple):
    """Where one parameter's new state comes from: the overlapping saved pieces, and the piece
    whose non-element values (the step, scalars) are taken."""

    pieces: list[Piece]
    ref: Piece


def plan_recut(
    mine: list[Entry], saved: Mapping[int, list[Entry]], tp_of: Mapping[int, int], my_tp: int, what: str
) -> list[Source]:
    """For each of my parameters, the saved pieces that overlap my range (ValueError on a mismatch).

    ``saved`` holds, by old rank, the layouts of the old ranks of my pipeline stage.
    """
    ranks = sorted(saved)
    for r in ranks:
        if len(saved[r]) != len(mine):
            raise ValueError(
                f"{what}: saved on rank {r} with {len(saved[r])} parameters, this optimizer has {len(mine)} (an "
                "optimizer over model.parameters() has one per parameter, one over bmt.grouped_parameters(model) "
                "one per flat buffer)"
            )
    out = []
    for i, m in enumerate(mine):
        entries = [(r, saved[r][i]) for r in ranks if not m.tp_mode or tp_of[r] == my_tp]
        if not entries:
            raise ValueError(f"{what}: no saved rank holds parameter {i} for tp rank {my_tp}")
        for r, e in entries:
            if (e.content is None) != (m.content is None):
                kind = "a flat buffer's shard" if m.content is not None else "a parameter"
                raise ValueError(
                    f"{what}: parameter {i} is {kind} here but not in the checkpoint (rank {r}): the optimizer "
                    "was given model.parameters() in one run and bmt.grouped_parameters(model) in the other (or the "
                    "checkpoint predates flat-shard layouts: those load only at the world size they were saved at)"
                )
            size, theirs = (m.numel, e.numel) if m.content is None else (m.content, e.content)
            if theirs != size:
                raise ValueError(
                    f"{what}: parameter {i} has {size} elements here but {theirs} in the checkpoint "
                    f"(rank {r}): not the model it was saved from"
                )
        if not entries[0][1].sharded:  # whole on every old rank: the lowest one's copy
            entries = entries[:1]
        pieces = [Piece(r, e.start, e.end) for r, e in entries if m.start < e.end and e.start < m.end]
        # a flat buffer's padding past its content (sized by the group) needs no saved value: it is zero
        need_end = m.end if m.content is None else max(m.start, min(m.end, m.content))
        covered = sum(max(0, min(p.end, need_end) - max(p.start, m.start)) for p in pieces)
        if covered != need_end - m.start:
            raise ValueError(
                f"{what}: the saved pieces of parameter {i} cover {covered} of this rank's {need_end - m.start} elements"
            )
        r0, e0 = entries[0]
        out.append(Source(pieces, pieces[0] if pieces else Piece(r0, e0.start, e0.end)))
    return out


def _elementwise(adam: bool, key: str, value: Any, piece_len: int) -> bool:
    """Whether a state value has one element per parameter element (and is cut with it)."""
    if not isinstance(value, torch.Tensor):
        return False
    if adam:
        return key in STATE_TENSORS
    return value.dim() >= 1 and value.numel() == piece_len  # e.g. torch.optim.Adam's moments


def recut_state(
    opt: torch.optim.Optimizer,
    mine: list[Entry],
    plan: list[Source],
    saved_sd: Callable[[int], Mapping[str, Any]],
    first: int,
) -> dict[str, Any]:
    """This rank's state dict for ``opt`` built from the saved pieces (``saved_sd(rank)``: that old
    rank's state dict of this optimizer; ``first``: the old rank whose param_groups are taken)."""
    adam = isinstance(opt, AdamBase)
    base = saved_sd(first)
    state: dict[int, dict[str, Any]] = {}
    for i, (m, src) in enumerate(zip(mine, plan, strict=True)):
        has = {p.rank: i in saved_sd(p.rank)["state"] for p in [*src.pieces, src.ref]}
        if not any(has.values()):
            continue  # never stepped: no state, as in a fresh optimizer
        if not all(has.values()):
            missing = sorted(r for r, h in has.items() if not h)
            raise ValueError(f"parameter {i} has optimizer state on some saved ranks but not on ranks {missing}")
        ref = saved_sd(src.ref.rank)["state"][i]
        ref_len = src.ref.end - src.ref.start
        new: dict[str, Any] = {}
        for key, value in ref.items():
            if adam and key in _PER_RANK_KEYS:
                continue
            if not _elementwise(adam, key, value, ref_len):
                new[key] = value.clone() if isinstance(value, torch.Tensor) else value
                continue
            if len(src.pieces) == 1 and (src.pieces[0].start, src.pieces[0].end) == (m.start, m.end):
                new[key] = value.clone()  # the same piece: keep its shape
                continue
            out = torch.zeros(m.end - m.start, dtype=value.dtype)  # zeros: a flat shard's new padding
            for p in src.pieces:
                t = saved_sd(p.rank)["state"][i].get(key)
                if not isinstance(t, torch.Tensor) or t.numel() != p.end - p.start:
                    raise ValueError(f"state {key!r} of parameter {i} on saved rank {p.rank} is not one value per element")
                a, b = max(p.start, m.start), min(p.end, m.end)
                out[a - m.start : b - m.start].copy_(t.reshape(-1)[a - p.start : b - p.start])
            new[key] = out
        state[i] = new
    sd = {k: v for k, v in base.items() if k != "state"}
    sd["state"] = state
    return sd
