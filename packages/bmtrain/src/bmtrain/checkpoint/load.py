"""``load_checkpoint``: every rank checks what it will read, all agree, then the state is loaded.

Order, so that a bad checkpoint leaves the model and optimizer untouched: (1) rank 0 finds the
checkpoint and reads its manifest; (2) each rank checks the files it will read (sizes and
SHA-256 from the manifest; the model's files by size) and the model's names, shapes and dtypes
against the checkpoint's; (3) the optimizer states are read and, at another ZeRO size, re-cut;
only then (4) the model is loaded, (5) the optimizer states applied, (6) the RNG states set.
Every step that can fail on one rank ends in one small all-gather, so all ranks raise alike.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import bmt_comm
import torch
from bmt_optim._adam_base import AdamBase
from bmt_zero.store import load as load_gathered
from bmt_zero.store import load_sharded

from ._agree import CheckpointError, agree, describe, settle
from ._files import LATEST_FILE, MANIFEST_FILE, rank_file, read_manifest, verify
from ._optim import Entry, Source, TrainState, layout_of, plan_recut, recut_state, resolve
from ._rng import restore_rng
from ._signature import local_signature, signature_mismatch, union

__all__ = ["CheckpointInfo", "load_checkpoint"]


@dataclass(frozen=True)
class CheckpointInfo:
    """What ``load_checkpoint`` restored, on this rank."""

    path: str  # the checkpoint directory that was read
    tag: str
    step: int
    extra: Any  # this rank's saved ``extra`` (rank 0's when this rank did not exist then)
    world_size: int  # of the run that saved it
    resharded: bool  # saved at another world, tp or pipeline size: states were re-cut
    rng_restored: tuple[str, ...]  # generators set from the checkpoint here (empty: none)


def _load(path: str) -> Any:
    return torch.load(path, map_location="cpu", mmap=True, weights_only=True)  # pages read as used


def _find(path: str, tag: str | None, missing_ok: bool) -> tuple[str, dict[str, Any]] | None:
    """Rank 0: the checkpoint directory and its manifest; None when nothing is there and that's ok."""
    if tag is not None:
        return os.path.join(path, tag), read_manifest(os.path.join(path, tag))
    if os.path.isfile(os.path.join(path, MANIFEST_FILE)):
        return path, read_manifest(path)
    latest = os.path.join(path, LATEST_FILE)
    if os.path.isfile(latest):
        with open(latest, encoding="utf-8") as f:
            name = f.read().strip()
        if not name or os.sep in name or name.startswith("."):
            raise ValueError(f"{latest} names {name!r}, not a checkpoint directory under {path}")
        return os.path.join(path, name), read_manifest(os.path.join(path, name))
    entries = os.listdir(path) if os.path.isdir(path) else []
    if any(n.startswith(("optim-", "meta-", "extra-")) or n in ("model", "model.pt") for n in entries):
        raise FileNotFoundError(
            f"{path} has no {MANIFEST_FILE}: an incomplete checkpoint (its save did not finish, or the "
            f"manifest was removed)"
        )
    if missing_ok and (not os.path.exists(path) or all(n.startswith(".") for n in os.listdir(path))):
        return None
    raise FileNotFoundError(
        f"{path} holds no training checkpoint: neither {MANIFEST_FILE} (a checkpoint directory whose "
        f"save completed) nor {LATEST_FILE} (a root that save_checkpoint wrote)"
    )


def _optimizer_of(payloads: Mapping[int, Any], o: int) -> Callable[[int], Mapping[str, Any]]:
    """Old rank -> its saved state dict of optimizer ``o``."""
    return lambda r: payloads[r]["optimizers"][o]  # type: ignore[no-any-return]


def _owned(obj: Any) -> Any:
    """A copy whose tensors are ordinary memory (not pages of a mapped file)."""
    return copy.deepcopy(obj) if obj is not None else None


def load_checkpoint(
    directory: str | os.PathLike[str],
    model: torch.nn.Module,
    optimizer: Any = None,
    lr_scheduler: Any = None,
    *,
    tag: str | None = None,
    load_optimizer: bool = True,
    load_rng: bool = True,
    missing_ok: bool = False,
) -> CheckpointInfo | None:
    """Collective: restore what ``save_checkpoint`` saved; return what was loaded.

    ``directory``: a root written by ``save_checkpoint`` (its ``latest`` checkpoint is read, or
    ``tag``'s) or one checkpoint directory. ``optimizer``/``lr_scheduler``: as given to
    ``save_checkpoint``. With ``missing_ok``, a root that does not exist or holds nothing returns
    None on every rank (a first run). At the saved world size everything is restored bitwise; at
    another ZeRO size (same tp and pipeline sizes) the model and optimizer states are re-cut, each
    rank reads only the saved pieces that overlap its own; ranks below the saved world size get
    their own saved RNG states, the others keep theirs. A model of other names, shapes or dtypes,
    a missing or damaged file, or an incomplete manifest raises ``CheckpointError`` on every rank
    before the model or optimizer is touched.
    """
    ctx = bmt_comm.get_context()
    world, topo = ctx.comms.world, ctx.topology
    rank, size = world.rank, world.size
    path = os.path.abspath(os.fspath(directory))

    found: Any = None
    if rank == 0:
        try:
            where = _find(path, tag, missing_ok)
            found = ("missing", None) if where is None else ("ok", where)
        except Exception as ex:
            found = ("error", describe(ex))
    found = bmt_comm.broadcast_object(found, world, 0)
    if found[0] == "missing":
        return None
    if found[0] == "error":
        raise CheckpointError(f"load_checkpoint from {path}: {found[1]}")
    ckpt, manifest = found[1]
    what = f"load_checkpoint from {ckpt}"
    old_world, old_tp, old_pipe = manifest["world_size"], manifest["tp_size"], manifest["pipe_size"]
    same = (old_world, old_tp, old_pipe) == (size, topo.tp_size, topo.pipe_size)
    recut_ok = (old_tp, old_pipe) == (topo.tp_size, topo.pipe_size)

    # (2) what this rank will read, checked; the model compared with the checkpoint's
    own: str | None = None
    state = TrainState(None, [], [])
    meta_ranks: list[int] = [rank] if rank < old_world else []
    try:
        state = resolve(optimizer, lr_scheduler) if load_optimizer else state
        if state.optimizers or state.schedulers or state.manager is not None:
            saved_opt, here = manifest.get("optimizer", {}), state.describe()
            if saved_opt != here:
                raise ValueError(f"the checkpoint holds optimizer state {saved_opt}, this run passes {here}")
            if state.optimizers and not recut_ok:
                raise ValueError(
                    f"optimizer states saved at tp_size {old_tp} and pipe_size {old_pipe} re-cut only at the "
                    f"same tp and pipe sizes (this run: {topo.tp_size} and {topo.pipe_size}); "
                    f"pass load_optimizer=False to load the model alone"
                )
            if state.optimizers and not same:  # the layouts of my stage's old ranks
                per_stage = old_world // old_pipe
                meta_ranks = sorted({*meta_ranks, *range(topo.stage_id * per_stage, (topo.stage_id + 1) * per_stage)})
            elif rank >= old_world:  # schedulers and loss scale: from old rank 0
                meta_ranks = [0]
        names = [rank_file("meta", r, old_world) for r in meta_ranks]
        names.append(rank_file("extra", rank if rank < old_world else 0, old_world))
        if rank == 0:
            names += [n for n, e in manifest["files"].items() if e.get("sha256") is None]  # the model's: sizes
        problems = [m for n in names if (m := verify(ckpt, n, manifest)) is not None]
        own = "; ".join(problems) if problems else None
    except (TypeError, ValueError) as ex:
        own = describe(ex)
    gathered = bmt_comm.allgather_objects((own, local_signature(model)), world)
    settle([g[0] for g in gathered], what)
    mismatch = signature_mismatch(manifest["model"]["signature"], union([g[1] for g in gathered]))
    if mismatch is not None:  # the same on every rank: computed from the same gathered lists
        raise CheckpointError(f"{what}: {mismatch}")

    # (3) optimizer states read (and re-cut) before anything is changed
    metas: dict[int, Any] = {}
    plans: list[list[Source]] | None = None
    optim_ranks: list[int] = []
    own = None
    try:
        metas = {r: _load(os.path.join(ckpt, rank_file("meta", r, old_world))) for r in meta_ranks}
        mine = [layout_of(o) for o in state.optimizers]
        if state.optimizers:
            saved_layouts = [[Entry(*e) for e in lay] for lay in metas[rank]["layouts"]] if same else None
            if saved_layouts is not None and saved_layouts in (mine, [layout_of(o, legacy=True) for o in state.optimizers]):
                optim_ranks = [rank]
            else:
                tp_of = {r: int(m["tp"]) for r, m in metas.items()}
                plans = [
                    plan_recut(lay, {r: [Entry(*e) for e in m["layouts"][o]] for r, m in metas.items()},
                               tp_of, topo.tp_id, f"optimizer {o}")
                    for o, lay in enumerate(mine)
                ]
                used = {p.rank for plan in plans for s in plan for p in (*s.pieces, s.ref)}
                optim_ranks = sorted(used | {min(metas)})
        elif state.schedulers or state.manager is not None:
            optim_ranks = [meta_ranks[0]]
        problems = [m for r in optim_ranks if (m := verify(ckpt, rank_file("optim", r, old_world), manifest))]
        own = "; ".join(problems) if problems else None
    except Exception as ex:
        own = describe(ex)
    agree(own, what)

    own = None
    opt_sds: list[dict[str, Any]] = []
    head: dict[str, Any] = {}
    extra: Any = None
    try:
        payloads = {r: _load(os.path.join(ckpt, rank_file("optim", r, old_world))) for r in optim_ranks}
        if optim_ranks:
            head = payloads[optim_ranks[0]] if plans is None else payloads[min(metas)]
        for o, opt in enumerate(state.optimizers):
            if plans is None:
                sd = payloads[rank]["optimizers"][o]
                opt_sds.append(sd if isinstance(opt, AdamBase) else _owned(sd))  # Adam copies on load
            else:
                opt_sds.append(recut_state(opt, mine[o], plans[o], _optimizer_of(payloads, o), min(metas)))
        extra_file = rank_file("extra", rank if rank < old_world else 0, old_world)
        extra = torch.load(os.path.join(ckpt, extra_file), map_location="cpu", weights_only=False)
    except Exception as ex:
        own = describe(ex)
    agree(own, what)

    # (4) the model
    model_path = os.path.join(ckpt, manifest["model"]["path"])
    try:
        if manifest["model"]["kind"] == "sharded":
            load_sharded(model, model_path, strict=True)
        else:
            load_gathered(model, model_path, strict=True)
    except Exception as ex:  # the store raises on every rank alike
        raise CheckpointError(f"{what}: loading the model failed: {describe(ex)}") from ex

    # (5) optimizers, manager, schedulers
    own = None
    try:
        if state.manager is not None:
            state.manager.load_state_dict({**_owned(head["manager"]), "optimizers": opt_sds})
        else:
            for opt, sd in zip(state.optimizers, opt_sds, strict=True):
                opt.load_state_dict(sd)
        for sched, sd in zip(state.schedulers, head.get("lr_schedulers", []), strict=True):
            sched.load_state_dict(_owned(sd))
    except Exception as ex:
        own = describe(ex)
    agree(own, f"{what}: the model is loaded but applying the optimizer states failed")

    # (6) random number generators
    restored: tuple[str, ...] = ()
    if load_rng and rank < old_world:
        restored = tuple(restore_rng(metas[rank]["rng"], ctx.device))
    return CheckpointInfo(ckpt, str(manifest.get("tag", os.path.basename(ckpt))), int(manifest["step"]), extra,
                          old_world, not same, restored)
