"""A bad checkpoint fails alike on every rank and touches nothing; a failed save keeps the
previous checkpoint; ``latest`` and ``keep_last`` (gloo, 2 ranks)."""

from __future__ import annotations

import copy
import errno
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from ..harness import run_distributed
from ._training import Plan, assert_same, build, run

CPU = {"CUDA_VISIBLE_DEVICES": ""}


def _train_one(model: Any, manager: Any, step: int) -> None:
    import bmt_comm
    import torch.nn.functional as F

    from ..ckpt.models import Config, batch, rows
    from ._training import GLOBAL_BATCH

    ctx = bmt_comm.get_context()
    x, y = batch(Config(dim=16, heads=2, hidden=24, layers=2, seq=5), GLOBAL_BATCH, seed=100 + step)
    x, y = rows(x, ctx.rank, ctx.world_size), rows(y, ctx.rank, ctx.world_size)
    manager.zero_grad()
    out = model(x)
    manager.backward(F.mse_loss(out, y[..., : out.shape[-1]]))
    manager.step()


def _state(model: Any, opt: Any, manager: Any) -> dict[str, Any]:
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "optim": copy.deepcopy({i: s for i, s in enumerate(opt.state.values())}),
        "groups": copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]),
        "manager": {k: v for k, v in manager.state_dict().items() if k != "optimizers"},
    }


def _damage(good: str, bad: str, how: str) -> None:
    shutil.copytree(good, bad)
    if how == "no manifest":
        os.remove(os.path.join(bad, "manifest.json"))
    elif how == "truncated manifest":
        with open(os.path.join(bad, "manifest.json"), "r+b") as f:
            f.truncate(os.path.getsize(f.name) // 2)
    elif how == "missing optimizer file of rank 1":
        os.remove(os.path.join(bad, "optim-00001-of-00002.pt"))
    elif how == "corrupted meta file of rank 0":
        with open(os.path.join(bad, "meta-00000-of-00002.pt"), "r+b") as f:
            f.seek(os.path.getsize(f.name) // 2)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0xFF]))
    elif how == "missing model file of rank 1":
        os.remove(os.path.join(bad, "model", "rank-00001-of-00002.safetensors"))
    elif how != "another model":
        raise AssertionError(how)


CASES = {
    "no manifest": "has no manifest.json: an incomplete checkpoint",
    "truncated manifest": "not valid JSON",
    "missing optimizer file of rank 1": "missing file optim-00001-of-00002.pt",
    "corrupted meta file of rank 0": "meta-00000-of-00002.pt has SHA-256",
    "missing model file of rank 1": "missing file model/rank-00001-of-00002.safetensors",
    "another model": "head is [16, 8] float32 here but [16, 16] float32 in the checkpoint",
}


def _bad_loads(good: str, scratch: str) -> dict[str, str]:
    import bmt_comm
    from bmtrain import CheckpointError, load_checkpoint

    rank = bmt_comm.get_context().rank
    messages = {}
    for how in [*CASES, "no checkpoint"]:
        plan = Plan(head=8 if how == "another model" else 16)
        model, opt, manager = build(plan)
        _train_one(model, manager, 0)  # some optimizer state to keep
        before = _state(model, opt, manager)
        bad = os.path.join(scratch, how.replace(" ", "-"))
        if rank == 0:
            if how == "no checkpoint":
                os.makedirs(os.path.join(bad, "step-00000002"))  # a root without latest
            else:
                _damage(good, bad, how)
        bmt_comm.synchronize()
        with pytest.raises(CheckpointError) as caught:
            load_checkpoint(bad, model, manager)
        messages[how] = str(caught.value)
        assert_same(_state(model, opt, manager), before, f"{how}: model and optimizer untouched")
    empty = os.path.join(scratch, "empty")
    if rank == 0:
        os.makedirs(empty)
    bmt_comm.synchronize()
    model, _, manager = build(Plan())
    assert load_checkpoint(empty, model, manager, missing_ok=True) is None
    assert load_checkpoint(os.path.join(scratch, "nowhere"), model, manager, missing_ok=True) is None
    return messages


def test_bad_checkpoints_raise_the_same_error_on_every_rank_and_touch_nothing(tmp_path: Path) -> None:
    root = tmp_path / "root"
    run_distributed(run, 2, Plan(stop=2, root=str(root), save_at=(2,)), env=CPU, timeout=180)
    messages = run_distributed(_bad_loads, 2, str(root / "step-00000002"), str(tmp_path), env=CPU, timeout=240)
    assert messages[0] == messages[1]
    for how, expected in {**CASES, "no checkpoint": "holds no training checkpoint"}.items():
        assert expected in messages[0][how], (how, messages[0][how])


def _fail_midway(root: str) -> dict[str, Any]:
    import bmt_comm
    import bmtrain.checkpoint._files as files
    from bmtrain import CheckpointError, load_checkpoint, save_checkpoint

    rank = bmt_comm.get_context().rank
    model, opt, manager = build(Plan())
    for step in range(2):
        _train_one(model, manager, step)
    save_checkpoint(root, model, manager, step=2, keep_last=1)
    at_two = _state(model, opt, manager)
    _train_one(model, manager, 2)
    real = files.save_object

    def full_disk(path: str, obj: Any) -> None:
        if rank == 1 and os.path.basename(path).startswith("optim-"):
            with open(path, "xb") as f:
                f.write(b"\0" * 1000)  # half a file, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        real(path, obj)

    files.save_object = full_disk
    try:
        with pytest.raises(CheckpointError) as caught:
            save_checkpoint(root, model, manager, step=3, keep_last=1)
    finally:
        files.save_object = real
    bmt_comm.synchronize()
    listing = sorted(os.listdir(root))
    with open(os.path.join(root, "latest")) as f:
        latest = f.read()
    model2, opt2, manager2 = build(Plan())
    info = load_checkpoint(root, model2, manager2)
    assert info is not None and info.step == 2
    assert_same(_state(model2, opt2, manager2), at_two, "the previous checkpoint, loaded")
    return {"message": str(caught.value), "listing": listing, "latest": latest}


def test_a_write_failure_keeps_the_previous_checkpoint_and_latest(tmp_path: Path) -> None:
    out = run_distributed(_fail_midway, 2, str(tmp_path / "root"), env=CPU, timeout=180)
    assert out[0]["message"] == out[1]["message"]
    assert "rank 1: OSError: [Errno 28] No space left on device" in out[0]["message"]
    assert out[0]["listing"] == ["latest", "step-00000002"]  # no temporary left, no step 3
    assert out[0]["latest"] == "step-00000002\n"


def _keep_last(root: str) -> dict[str, Any]:
    import bmt_comm
    from bmtrain import load_checkpoint, save_checkpoint

    model, opt, manager = build(Plan())
    listings = []
    for step in range(1, 6):
        _train_one(model, manager, step)
        save_checkpoint(root, model, manager, step=step, keep_last=2, sharded=step < 5)
        listings.append(sorted(os.listdir(root)))
    final = _state(model, opt, manager)
    model2, opt2, manager2 = build(Plan())
    info = load_checkpoint(root, model2, manager2)
    assert info is not None and info.step == 5
    assert_same(_state(model2, opt2, manager2), final, "the latest (gathered model) checkpoint")
    older = load_checkpoint(root, model2, manager2, tag="step-00000004")
    assert older is not None and older.step == 4
    bmt_comm.synchronize()
    return {"listings": listings, "files": sorted(os.listdir(os.path.join(root, "step-00000005")))}


def test_keep_last_and_latest(tmp_path: Path) -> None:
    out = run_distributed(_keep_last, 2, str(tmp_path / "root"), env=CPU, timeout=180)
    assert out[0]["listings"] == [
        ["latest", "step-00000001"],
        ["latest", "step-00000001", "step-00000002"],
        ["latest", "step-00000002", "step-00000003"],
        ["latest", "step-00000003", "step-00000004"],
        ["latest", "step-00000004", "step-00000005"],
    ]
    assert "model.pt" in out[0]["files"] and "model" not in out[0]["files"]  # sharded=False
    assert torch.load(tmp_path / "root" / "step-00000005" / "model.pt", weights_only=True)["head"].shape == (16, 16)
