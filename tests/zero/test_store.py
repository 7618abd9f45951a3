"""bmt_zero.save / load: one file plain torch.load reads; atomic; non-blocking; errors as torch's."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from ._models import full_state as _full_state
from ._models import same as _same
from ._models import store_model as _model


def _check_store(tmp: str) -> None:
    import bmt_comm
    import bmt_zero
    from bmt_zero.store import _save_to_rank0, background

    rank = bmt_comm.rank()
    model = _model()
    want = _full_state(model)
    assert "lin.weight" in want and "norm.num_batches_tracked" in want and "mlp.w1" in want

    # ModelCenter-style override: full dict on rank 0 only, no recursion
    sd = model.state_dict()
    if rank == 0:
        _same(sd, want, "override")
    else:
        assert len(sd) == 0

    path = os.path.join(tmp, "ckpt.pt")
    bmt_zero.save(model, path)
    if rank == 0:
        on_disk = torch.load(path)  # plain torch, no map_location needed: everything is on CPU
        assert hasattr(on_disk, "_metadata") and on_disk._metadata["mlp"]["version"] == 1
        _same(on_disk, want, "file")
        assert all(v.device.type == "cpu" for v in on_disk.values())

    # load: the file is needed on rank 0 only
    only0 = os.path.join(tmp, "rank0-only.pt")
    if rank == 0:
        os.link(path, only0)
    fresh = _model(scale=0.0)
    result = bmt_zero.load(fresh, only0 if rank == 0 else os.path.join(tmp, "nowhere.pt"))
    assert result.missing_keys == [] and result.unexpected_keys == []
    _same(_full_state(fresh), want, "load")

    # wrong shape: every rank raises torch's message naming the key and both shapes
    wide = _model(wide=True)
    wide_path = os.path.join(tmp, "wide.pt")
    bmt_zero.save(wide, wide_path)
    with pytest.raises(RuntimeError, match=r"size mismatch for emb: copying a param with shape "
                                           r"torch.Size\(\[12, 3\]\) from checkpoint, the shape in "
                                           r"current model is torch.Size\(\[11, 3\]\)"):
        bmt_zero.load(_model(scale=0.0), wide_path)

    # missing / unexpected keys as torch reports them (strict=False returns them)
    partial = {k: v for k, v in want.items() if k not in ("mlp.b2", "norm.running_var")}
    partial["mlp.extra"] = torch.ones(2)
    partial["ghost.weight"] = torch.ones(2)
    odd_path = os.path.join(tmp, "odd.pt")
    if rank == 0:
        torch.save(partial, odd_path)
    bmt_comm.synchronize()
    got = bmt_zero.load(_model(scale=0.0), odd_path, strict=False)
    twin = _model(scale=0.0)
    torch_says = torch.nn.Module.load_state_dict(twin, partial, strict=False)  # torch's own walk
    assert (got.missing_keys, got.unexpected_keys) == (torch_says.missing_keys, torch_says.unexpected_keys)
    assert got.missing_keys == ["mlp.b2", "norm.running_var"]
    assert got.unexpected_keys == ["ghost.weight", "mlp.extra"]  # the root reports first
    with pytest.raises(RuntimeError, match=r'(?s)Missing key\(s\) in state_dict: "mlp.b2", "norm.running_var".*'
                                           r'Unexpected key\(s\) in state_dict: "ghost.weight", "mlp.extra"'):
        bmt_zero.load(_model(scale=0.0), odd_path)
    with pytest.raises((FileNotFoundError, RuntimeError), match="reading the checkpoint failed on rank 0|No such file"):
        bmt_zero.load(_model(scale=0.0), os.path.join(tmp, "missing.pt"))

    # a save interrupted midway leaves the previous file intact and no temporary behind
    real_save = torch.save

    def broken_save(obj: object, f: object) -> None:
        f.write(b"PK\x03\x04 half a checkpoint")  # type: ignore[attr-defined]
        raise OSError("disk full (simulated)")

    changed = _model(scale=2.0)
    torch.save = broken_save
    try:
        with pytest.raises((OSError, RuntimeError), match="disk full"):
            bmt_zero.save(changed, path)
    finally:
        torch.save = real_save
    if rank == 0:
        _same(torch.load(path), want, "after interrupted save")
        assert sorted(os.listdir(tmp)) == ["ckpt.pt", "ckpt.pt.manifest.json", "odd.pt", "rank0-only.pt", "wide.pt",
                                           "wide.pt.manifest.json"], os.listdir(tmp)

    # non-blocking: the file holds the values at save time though training goes on meanwhile
    def slow_save(obj: object, f: object) -> None:
        time.sleep(0.3)
        real_save(obj, f)

    nb_path = os.path.join(tmp, "nb.pt")
    torch.save = slow_save  # looked up by the writer thread: patched until it has finished
    try:
        bmt_zero.save(model, nb_path, non_blocking=True)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(100.0)  # in place, while rank 0's thread is still writing
            model.norm.running_mean.add_(100.0)
        if rank == 0:
            assert not os.path.exists(nb_path)  # still being written
        bmt_zero.save(model, os.path.join(tmp, "after.pt"))  # waits for the pending one first
    finally:
        torch.save = real_save
    if rank == 0:
        _same(torch.load(nb_path), want, "non-blocking file")
        assert torch.equal(torch.load(os.path.join(tmp, "after.pt"))["mlp.w1"], want["mlp.w1"] + 100.0)

    # a failed background write is raised by the next save, on every rank
    calls = []

    def broken_once(obj: object, f: object) -> None:
        calls.append(1)
        if len(calls) == 1:
            broken_save(obj, f)
        real_save(obj, f)

    torch.save = broken_once
    try:
        bmt_zero.save(model, nb_path, non_blocking=True)
        with pytest.raises((OSError, RuntimeError), match="disk full"):
            bmt_zero.save(model, nb_path)
    finally:
        torch.save = real_save
    assert len(calls) == (1 if rank == 0 else 0)  # the failed write was reported, not retried
    assert background.wait() is None
    if rank == 0:
        _same(torch.load(nb_path), want, "non-blocking file after a failed rewrite")
    assert _save_to_rank0(model) is not None


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_save_load(spawn, world_size, tmp_path):
    spawn(_check_store, str(tmp_path))


def test_exit_waits_for_non_blocking_save(tmp_path):
    """The interpreter does not exit before a background save has finished writing."""
    path = tmp_path / "exit.pt"
    script = textwrap.dedent(f"""
        import time, torch, bmt_comm, bmt_zero
        bmt_comm.init_distributed()
        real = torch.save
        def slow(obj, f):
            time.sleep(1.0)
            real(obj, f)
        torch.save = slow
        model = bmt_zero.make_distributed(torch.nn.Linear(3, 2))
        bmt_zero.save(model, {str(path)!r}, non_blocking=True)
        assert not __import__("os").path.exists({str(path)!r})
    """)
    env = dict(os.environ, WORLD_SIZE="1", RANK="0")
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=120)
    assert list(torch.load(path)) == ["weight", "bias"]


# --- a module whose children live on some ranks only (the protocol a pipeline uses) ---------------
class _Leaf(torch.nn.Module):
    """Plain torch: a parameter, a buffer and extra state, read through the lazy state dict."""

    def __init__(self, bonus: bool = False) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 2)
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))
        if bonus:
            self.register_buffer("bonus", torch.zeros(2))
        self.note = ""

    def get_extra_state(self) -> dict[str, str]:
        return {"note": self.note}

    def set_extra_state(self, state: dict[str, str]) -> None:
        self.note = state["note"]


class _Spread(torch.nn.Module):
    """Children by name, each held by some ranks only; ``_bmt_children_everywhere`` lists them all."""

    def __init__(self, rank: int, holders: dict[str, tuple[int, ...]], bonus_on: int = -1) -> None:
        super().__init__()
        self.top = torch.nn.Parameter(torch.zeros(4))  # the root's own: every rank loads it
        self.register_buffer("steps", torch.zeros(2, dtype=torch.int64))
        self._names = list(holders)
        for name, ranks in holders.items():
            if rank in ranks:
                self.add_module(name, _Leaf(bonus=rank == bonus_on))

    def _bmt_children_everywhere(self) -> list[str]:
        return self._names

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        """torch's, except that keys of the children held elsewhere are theirs (not unexpected here)."""
        start = len(unexpected)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)
        unexpected[start:] = [k for k in unexpected[start:] if k[len(prefix) :].split(".")[0] not in self._names]


_HOLDERS = {"a": (1,), "b": (0, 2), "c": (0, 1, 2), "d": (2,)}  # rank 0 (the file's) follows a and d


def _spread_state() -> dict[str, object]:
    torch.manual_seed(7)
    twin = _Spread(-1, {})
    for name in _HOLDERS:
        twin.add_module(name, _Leaf())
    with torch.no_grad():
        for p in twin.parameters():
            p.uniform_(-1, 1)
        twin.steps.copy_(torch.tensor([3, 4]))
        for i, name in enumerate(_HOLDERS):
            leaf = twin.get_submodule(name)
            leaf.count.fill_(10 + i)
            leaf.note = f"layer {name}"
    return dict(twin.state_dict())


def _check_spread_load(tmp: str) -> None:
    import bmt_comm
    import bmt_zero

    rank = bmt_comm.rank()
    want = _spread_state()
    path, odd_path = os.path.join(tmp, "spread.pt"), os.path.join(tmp, "odd.pt")
    odd = {k: v for k, v in want.items() if k not in ("d.lin.bias", "b.count")}
    odd.update({"a.ghost": torch.ones(1), "e.lin.weight": torch.ones(1), "b.bonus": torch.ones(2)})
    if rank == 0:
        torch.save(want, path)
        torch.save(odd, odd_path)
    bmt_comm.synchronize()

    # each rank's children get their values; the others' never reach it
    model = _Spread(rank, _HOLDERS)
    result = bmt_zero.load(model, path)
    assert (result.missing_keys, result.unexpected_keys) == ([], [])
    got = model.state_dict()
    assert list(got) == [k for k in want if "." not in k or k.split(".")[0] in model._modules]
    for k, v in got.items():
        assert torch.equal(v, want[k]) if isinstance(v, torch.Tensor) else v == want[k], k

    # each held child reports what torch reports for it
    twin = _Spread(-1, {})
    for name in _HOLDERS:
        twin.add_module(name, _Leaf())
    torch_says = torch.nn.Module.load_state_dict(twin, odd, strict=False)
    partial = bmt_zero.load(_Spread(rank, _HOLDERS), odd_path, strict=False)

    def here(keys: list[str]) -> list[str]:
        return [k for k in keys if k.split(".")[0] in model._modules or k.split(".")[0] not in _HOLDERS]

    assert partial.missing_keys == here(torch_says.missing_keys), partial.missing_keys
    assert partial.unexpected_keys == here(torch_says.unexpected_keys), partial.unexpected_keys

    # holders that ask for different entries, or a child nobody holds: an error on every rank, no hang
    with pytest.raises(RuntimeError, match=r"same checkpoint entries in the same order, but they asked for "
                                           r"rank 0: OBJECT 'b._extra_state', .*rank 2: FULL 'b.bonus'"):
        bmt_zero.load(_Spread(rank, _HOLDERS, bonus_on=2), odd_path, strict=False)
    with pytest.raises(RuntimeError, match=r"a part of the model that no rank holds"):
        bmt_zero.load(_Spread(rank, {"a": (0, 1, 2), "e": ()}), path, strict=False)
    result = bmt_zero.load(model, path)  # the world is still in step
    assert (result.missing_keys, result.unexpected_keys) == ([], [])


@pytest.mark.world_size(3)
def test_load_children_spread_over_ranks(spawn, tmp_path):
    """``_bmt_children_everywhere``: bmt_zero.load walks children held by some ranks only."""
    spawn(_check_spread_load, str(tmp_path))


def _check_spread_sharded_extra_state(tmp: str) -> None:
    """save_sharded/load_sharded keep each module's get_extra_state() object (modules held by some
    ranks only included): written once, in extra_state.pt, and handed to set_extra_state."""
    import json

    import bmt_comm
    import bmt_zero

    rank = bmt_comm.rank()
    want = _spread_state()
    whole = _Spread(-1, {})
    for name in _HOLDERS:
        whole.add_module(name, _Leaf())
    whole.load_state_dict(want)
    model = _Spread(rank, _HOLDERS)
    model.load_state_dict({k: v for k, v in want.items() if k.split(".")[0] in model._modules or "." not in k},
                          strict=False)
    ckpt = os.path.join(tmp, "spread_sharded")
    bmt_zero.save_sharded(model, ckpt)
    meta = json.load(open(os.path.join(ckpt, "metadata.json")))
    assert [k for k, _ in meta["extra_state"]["keys"]] == [f"{n}._extra_state" for n in _HOLDERS]
    assert torch.load(os.path.join(ckpt, "extra_state.pt")) == {f"{n}._extra_state": {"note": f"layer {n}"}
                                                                   for n in _HOLDERS}

    fresh = _Spread(rank, _HOLDERS)
    result = bmt_zero.load_sharded(fresh, ckpt)
    assert (result.missing_keys, result.unexpected_keys) == ([], [])
    for name, leaf in fresh.named_children():
        assert leaf.note == f"layer {name}", name
        assert torch.equal(leaf.count, want[f"{name}.count"]), name

    # a module without set_extra_state: its saved extra state is unexpected; the reverse is missing
    class Plain(_Leaf):
        get_extra_state = torch.nn.Module.get_extra_state
        set_extra_state = torch.nn.Module.set_extra_state

    odd = _Spread(rank, _HOLDERS)
    if "c" in odd._modules:
        odd.c = Plain()
    with pytest.raises(RuntimeError, match=r'Unexpected key\(s\) in state_dict: "c._extra_state"'):
        bmt_zero.load_sharded(odd, ckpt)
    result = bmt_zero.load_sharded(odd, ckpt, strict=False)
    assert (result.missing_keys, result.unexpected_keys) == ([], ["c._extra_state"])
    plain_ckpt = os.path.join(tmp, "plain_sharded")
    bmt_zero.save_sharded(odd, plain_ckpt)
    result = bmt_zero.load_sharded(_Spread(rank, _HOLDERS), plain_ckpt, strict=False)
    assert (result.missing_keys, result.unexpected_keys) == (["c._extra_state"], [])


@pytest.mark.world_size(3)
def test_sharded_checkpoint_keeps_extra_state(spawn, tmp_path):
    spawn(_check_spread_sharded_extra_state, str(tmp_path))
