"""Verified, atomic loads: a bad checkpoint gives the same clear error on every rank and leaves
the model bitwise unchanged; a failed write says what happened and keeps the previous one."""

from __future__ import annotations

import errno
import json
import os
import warnings
from collections.abc import Callable

import pytest
import torch

from ..harness import run_distributed
from ._models import block_model, full_state, same, store_model


def _flip(path: str, offset: int, n: int = 64) -> None:
    """Invert ``n`` bytes of ``path`` from ``offset`` (a disk or a copy gone wrong)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        data = bytearray(f.read(n))
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in data))


def _truncate(path: str, keep: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(keep)


def _fails(load: Callable[[], object], model: torch.nn.Module, before: dict[str, torch.Tensor]) -> tuple[str, str]:
    """Run a load that must fail; the model must be bitwise as it was. Returns (type, message)."""
    with pytest.raises(Exception) as info:  # noqa: PT011 - the type is compared across ranks by the caller
        load()
    same(full_state(model), before, "after a failed load")
    return type(info.value).__name__, str(info.value)


def _on_rank0(action: Callable[[], None]) -> None:
    import bmt_comm

    if bmt_comm.rank() == 0:
        action()
    bmt_comm.synchronize()


def _tensor_offset(path: str, tensor: torch.Tensor) -> int:
    """Where ``tensor``'s bytes are in a torch file."""
    data = open(path, "rb").read()
    at = data.find(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    assert at > 0, "tensor bytes not found in the file"
    return at


# --- bmt.save / bmt.load -------------------------------------------------------------------------
def _check_file_loads(tmp: str) -> list[tuple[str, str]]:
    import shutil

    import bmt_zero
    from bmt_zero.store import CheckpointError, verify_checkpoint

    want = full_state(store_model())
    good = os.path.join(tmp, "good.pt")
    bmt_zero.save(store_model(), good)
    assert os.path.exists(good + ".manifest.json")
    _on_rank0(lambda: same(dict(torch.load(good)), want, "plain torch.load still reads the file"))
    info = verify_checkpoint(good)
    assert info.kind == "file" and info.verified and info.files == (good,)

    model = store_model(scale=0.0)
    before = full_state(model)
    results = []

    def bad(name: str, damage: Callable[[str], None]) -> str:
        path = os.path.join(tmp, name)
        _on_rank0(lambda: (shutil.copy(good, path), shutil.copy(good + ".manifest.json", path + ".manifest.json"),
                           damage(path)))
        kind, message = _fails(lambda: bmt_zero.load(model, path), model, before)
        assert kind == "CheckpointError", (kind, message)
        results.append((kind, message))
        with pytest.raises(CheckpointError, match=r"corrupt|truncated"):
            verify_checkpoint(path)
        return message

    size = os.path.getsize(good)
    assert f"truncated: expected {size} bytes, found 1000" in bad("cut.pt", lambda p: _truncate(p, 1000))
    offset = _tensor_offset(good, want["emb"])
    assert "cut.pt" not in bad("data.pt", lambda p: _flip(p, offset))
    assert "is corrupt: its crc32 is" in results[-1][1] and "data.pt" in results[-1][1]
    assert "is corrupt" in bad("head.pt", lambda p: _flip(p, 40))  # the zip's first entry: data.pkl
    assert "manifest" in bad("side.pt", lambda p: _flip(p + ".manifest.json", 30, 4))

    # another model's checkpoint: every shape problem reported at once, before any copy
    wide = os.path.join(tmp, "wide.pt")
    bmt_zero.save(store_model(wide=True), wide)
    kind, message = _fails(lambda: bmt_zero.load(model, wide), model, before)
    assert kind == "CheckpointError" and "size mismatch for emb" in message
    results.append((kind, message))

    # a strict load with missing and unexpected keys copies nothing (torch's walk copies first)
    odd = {k: v for k, v in want.items() if k not in ("mlp.b2", "norm.running_var")}
    odd["ghost.weight"] = torch.ones(2)
    odd_path = os.path.join(tmp, "odd.pt")
    _on_rank0(lambda: torch.save(odd, odd_path))
    kind, message = _fails(lambda: bmt_zero.load(model, odd_path), model, before)
    assert kind == "CheckpointError" and 'Missing key(s) in state_dict: "mlp.b2", "norm.running_var"' in message
    assert 'Unexpected key(s) in state_dict: "ghost.weight"' in message
    results.append((kind, message))

    # the fallback a program makes: catch, load the older checkpoint; the ranks are still in step
    try:
        bmt_zero.load(model, os.path.join(tmp, "cut.pt"))
    except CheckpointError:
        bmt_zero.load(model, good)
    same(full_state(model), want, "fallback to the good checkpoint")

    # an old file (no manifest) loads, unverified, with one warning
    old = os.path.join(tmp, "old.pt")
    _on_rank0(lambda: torch.save(want, old))
    fresh = store_model(scale=0.0)
    import bmt_comm
    from bmt_zero.store import verify

    bmt_comm.process_state().slot(verify._Unverified).clear()  # once per process: odd.pt (no manifest either) has had it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bmt_zero.load(fresh, old)
    same(full_state(fresh), want, "old file")
    import bmt_comm

    if bmt_comm.rank() == 0:
        assert any("without verification" in str(w.message) for w in caught), [str(w.message) for w in caught]
    assert not verify_checkpoint(old).verified
    return results


@pytest.mark.world_size(2)
def test_bad_files_fail_alike_and_touch_nothing(spawn, tmp_path):
    per_rank = spawn(_check_file_loads, str(tmp_path))
    assert per_rank[0] == per_rank[1]  # the same exception type and message on every rank


class _FullDisk:
    """A file object whose disk fills up after ``room`` bytes."""

    def __init__(self, f, room: int) -> None:  # noqa: ANN001
        self._f, self._room = f, room

    def write(self, data) -> int:  # noqa: ANN001
        n = memoryview(data).nbytes
        if n > self._room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._room -= n
        return self._f.write(data)

    def flush(self) -> None:
        self._f.flush()


def _check_full_disk(tmp: str) -> list[tuple[str, str]]:
    import bmt_comm
    import bmt_zero
    from bmt_zero.store import checksum, gathered, sharded, verify_checkpoint

    rank = bmt_comm.rank()
    want = full_state(block_model())
    path = os.path.join(tmp, "model.pt")
    bmt_zero.save(block_model(), path)
    ckpt = os.path.join(tmp, "sharded")
    bmt_zero.save_sharded(block_model(), ckpt)
    listing = sorted(os.listdir(tmp)), sorted(os.listdir(ckpt))
    out = []

    def filling(room: int) -> Callable[..., checksum.HashingWriter]:
        return lambda f, **kw: checksum.HashingWriter(_FullDisk(f, room), **kw)  # type: ignore[arg-type]

    real = checksum.HashingWriter
    gathered.HashingWriter = filling(2000)  # type: ignore[misc]  # only rank 0 writes
    try:
        with pytest.raises(OSError) as info:
            bmt_zero.save(block_model(scale=2.0), path)
    finally:
        gathered.HashingWriter = real  # type: ignore[misc]
    assert info.value.errno == errno.ENOSPC, info.value
    assert f"no space left on device while writing {path!r}" in str(info.value), info.value
    assert f"the previous checkpoint at {path!r} is intact" in str(info.value)
    assert "unexpected pos" not in str(info.value)
    out.append((type(info.value).__name__, str(info.value)))

    if rank == 1:
        sharded.HashingWriter = filling(300)  # type: ignore[misc]
    try:
        with pytest.raises(OSError) as info:
            bmt_zero.save_sharded(block_model(scale=2.0), ckpt)
    finally:
        sharded.HashingWriter = real  # type: ignore[misc]
    assert info.value.errno == errno.ENOSPC and "rank-00001-of-00002.safetensors" in str(info.value), info.value
    assert f"the previous checkpoint at {ckpt!r} is intact" in str(info.value)
    out.append((type(info.value).__name__, str(info.value)))

    assert (sorted(os.listdir(tmp)), sorted(os.listdir(ckpt))) == listing  # no temporaries left

    # the disk fills up on the manifest, after the file: said so; the file loads, unverified
    late = os.path.join(tmp, "late.pt")

    def no_room(*args: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    real_manifest = gathered.write_manifest
    gathered.write_manifest = no_room  # type: ignore[assignment]
    try:
        with pytest.raises(OSError, match=r"was written but has no manifest \(it loads unverified\)") as info:
            bmt_zero.save(block_model(), late)
    finally:
        gathered.write_manifest = real_manifest
    assert info.value.errno == errno.ENOSPC
    assert not verify_checkpoint(late).verified
    out.append((type(info.value).__name__, str(info.value)))
    _on_rank0(lambda: None)  # every rank has checked it
    _on_rank0(lambda: os.remove(late))
    assert verify_checkpoint(path).verified and verify_checkpoint(ckpt).verified
    for load, where in ((bmt_zero.load, path), (bmt_zero.load_sharded, ckpt)):
        model = block_model(scale=0.0)
        load(model, where)
        same(full_state(model), want, f"previous checkpoint {where}")
    return out


@pytest.mark.world_size(2)
def test_full_disk_keeps_the_previous_checkpoint(spawn, tmp_path):
    per_rank = spawn(_check_full_disk, str(tmp_path))
    assert per_rank[0] == per_rank[1]


# --- save_sharded / load_sharded -----------------------------------------------------------------
def _header(path: str) -> tuple[int, dict]:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return 8 + n, json.loads(f.read(n))


def _check_sharded_loads(tmp: str) -> list[tuple[str, str]]:
    import shutil

    import bmt_comm
    import bmt_zero
    from bmt_zero.store import verify_checkpoint

    world = bmt_comm.world_size()
    good = os.path.join(tmp, "good")
    bmt_zero.save_sharded(block_model(), good)
    want = full_state(block_model())
    info = verify_checkpoint(good)
    assert info.kind == "sharded" and info.verified and info.tensors > 0
    meta = json.load(open(os.path.join(good, "metadata.json")))
    last = f"rank-{world - 1:05d}-of-{world:05d}.safetensors"
    model = block_model(scale=0.0)
    before = full_state(model)
    results = []

    def bad(name: str, damage: Callable[[str], None], expect: str) -> str:
        path = os.path.join(tmp, name)
        _on_rank0(lambda: (shutil.copytree(good, path), damage(path)))
        kind, message = _fails(lambda: bmt_zero.load_sharded(model, path), model, before)
        assert kind == "CheckpointError" and expect in message, (name, kind, message)
        results.append((kind, message))
        return message

    size = meta["file_info"][world - 1]["size"]
    bad("cut", lambda p: _truncate(os.path.join(p, last), size - 10), f"truncated: expected {size} bytes, found {size - 10}")
    bad("gone", lambda p: os.remove(os.path.join(p, last)), f"rank file {last} (rank {world - 1} of {world}) is missing")
    start, header = _header(os.path.join(good, last))
    key, entry = max(((k, v) for k, v in header.items() if k != "__metadata__"),
                     key=lambda kv: kv[1]["data_offsets"][1] - kv[1]["data_offsets"][0])
    at = start + entry["data_offsets"][0]
    bad("data", lambda p: _flip(os.path.join(p, last), at, 16), f"tensor {key!r}'s crc32 is")
    bad("head", lambda p: _flip(os.path.join(p, last), 20, 4), "is corrupt")
    assert last in results[-1][1]

    def bump(p: str) -> None:  # a byte of metadata.json that keeps it valid JSON: a piece's end
        m = os.path.join(p, "metadata.json")
        text = open(m).read().replace('"tp_size": 1', '"tp_size": 2', 1)
        open(m, "w").write(text)

    bad("meta", bump, "metadata.json is corrupt: its checksum")
    bad("cutmeta", lambda p: _truncate(os.path.join(p, "metadata.json"), 100), "not valid JSON")

    # a rank file of another save of the same shape: named as such
    other = os.path.join(tmp, "other")
    bmt_zero.save_sharded(block_model(scale=2.0), other)
    bad("mixed", lambda p: shutil.copy(os.path.join(other, last), os.path.join(p, last)), "belongs to another checkpoint")

    # metadata.json of another world size next to this one's files
    bmt_comm.synchronize()
    if world == 2:
        wider = os.path.join(tmp, "wider")
        run_meta = dict(meta, world_size=3, files=[f"rank-{r:05d}-of-00003.safetensors" for r in range(3)])
        from bmt_zero.store.checksum import sealed

        def swap(p: str) -> None:
            with open(os.path.join(p, "metadata.json"), "w") as f:
                json.dump(sealed({k: v for k, v in run_meta.items() if k != "file_info"}
                                 | {"file_info": meta["file_info"] + [meta["file_info"][0]]}), f)

        message = bad(os.path.basename(wider), swap, "rank-00000-of-00003.safetensors (rank 0 of 3) is missing")
        assert "rank files of world size 2" in message, message

    # another model: every shape problem at once, before any copy
    wide = os.path.join(tmp, "wide")
    bmt_zero.save_sharded(store_model(), wide)
    kind, message = _fails(lambda: bmt_zero.load_sharded(model, wide), model, before)
    assert kind == "CheckpointError" and 'Missing key(s) in state_dict: "head", "layers.0.w"' in message and '"mlp.w1"' in message, message
    results.append((kind, message))

    # the fallback: catch, load the good one; the ranks are still in step
    try:
        bmt_zero.load_sharded(model, os.path.join(tmp, "cut"))
    except bmt_zero.store.CheckpointError:
        bmt_zero.load_sharded(model, good)
    same(full_state(model), want, "fallback")
    return results


@pytest.mark.parametrize("world_size", [2, 4])
def test_bad_sharded_checkpoints_fail_alike_and_touch_nothing(spawn, world_size, tmp_path):
    per_rank = spawn(_check_sharded_loads, str(tmp_path))
    assert all(r == per_rank[0] for r in per_rank)


def _make_v1(tmp: str) -> None:
    """A checkpoint as version 1 wrote it: no save id, sizes or checksums anywhere."""
    import bmt_comm
    import bmt_zero
    from safetensors.torch import load_file, save_file

    bmt_zero.save_sharded(block_model(), os.path.join(tmp, "v1"))
    if bmt_comm.rank() == 0:
        d = os.path.join(tmp, "v1")
        meta = json.load(open(os.path.join(d, "metadata.json")))
        for name in meta["files"]:
            save_file(load_file(os.path.join(d, name)), os.path.join(d, name))
        old = {k: v for k, v in meta.items() if k not in ("save_id", "file_info", "checksum", "algorithm")}
        json.dump(dict(old, version=1), open(os.path.join(d, "metadata.json"), "w"))
    bmt_comm.synchronize()


def _load_everywhere(tmp: str) -> None:
    import bmt_zero

    want = full_state(block_model())
    for name in ("v1", "at2"):
        model = block_model(scale=0.0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bmt_zero.load_sharded(model, os.path.join(tmp, name))
        same(full_state(model), want, name)


def _save_at_two(tmp: str) -> None:
    import bmt_zero

    bmt_zero.save_sharded(block_model(), os.path.join(tmp, "at2"))


def test_resharding_and_old_checkpoints_still_load(tmp_path):
    """save_sharded at world 2 loads bitwise at 1 and 3; a version-1 checkpoint still loads."""
    from bmt_zero.store import verify_checkpoint

    tmp = str(tmp_path)
    run_distributed(_make_v1, 2, tmp)
    run_distributed(_save_at_two, 2, tmp)
    assert not verify_checkpoint(tmp_path / "v1").verified
    run_distributed(_load_everywhere, 1, tmp)
    run_distributed(_load_everywhere, 3, tmp)
