"""Checkpoint files follow the umask, and a failed background save is never silent."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap

import pytest
import torch
from bmt_zero.store.atomic import atomic_write


def _umask_subprocess(mask: int, path: str) -> int:
    script = textwrap.dedent(f"""
        import os, torch, bmt_comm, bmt_zero
        os.umask({mask:#o})
        bmt_comm.init_distributed()
        model = bmt_zero.make_distributed(torch.nn.Linear(3, 2))
        bmt_zero.save(model, {path + ".pt"!r})
        bmt_zero.save(model, {path + ".nb.pt"!r}, non_blocking=True)
        bmt_zero.save_sharded(model, {path + ".sharded"!r})
    """)
    env = dict(os.environ, WORLD_SIZE="1", RANK="0", CUDA_VISIBLE_DEVICES="")
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=120)
    return mask


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_checkpoint_files_get_0666_minus_the_umask(tmp_path, mask: int) -> None:
    base = str(tmp_path / "ckpt")
    _umask_subprocess(mask, base)
    want = 0o666 & ~mask
    files = [base + ".pt", base + ".nb.pt"]
    files += [os.path.join(base + ".sharded", f) for f in os.listdir(base + ".sharded")]
    files = [f for f in files if os.path.isfile(f)]
    assert len(files) >= 3
    for f in files:
        assert stat.S_IMODE(os.stat(f).st_mode) == want, f"{f}: {oct(os.stat(f).st_mode)} != {oct(want)}"


def test_atomic_write_mode_in_this_process(tmp_path) -> None:
    old = os.umask(0o027)
    try:
        atomic_write(tmp_path / "a.bin", lambda f: f.write(b"x"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "a.bin").st_mode) == 0o640
    assert (tmp_path / "a.bin").read_bytes() == b"x"
    assert os.listdir(tmp_path) == ["a.bin"]  # no temporary left


def test_failed_background_save_makes_the_process_exit_non_zero(tmp_path) -> None:
    bad = tmp_path / "missing-dir" / "last.pt"  # its directory does not exist: the write fails
    script = textwrap.dedent(f"""
        import torch, bmt_comm, bmt_zero
        bmt_comm.init_distributed()
        model = bmt_zero.make_distributed(torch.nn.Linear(3, 2))
        bmt_zero.save(model, {str(tmp_path / "ok.pt")!r}, non_blocking=True)
        bmt_zero.save(model, {str(bad)!r}, non_blocking=True)
        print("script done", flush=True)
    """)
    env = dict(os.environ, WORLD_SIZE="1", RANK="0", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-c", script], env=env, timeout=120, capture_output=True, text=True)
    assert "script done" in proc.stdout
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    assert "the last non-blocking save failed" in proc.stderr and "FileNotFoundError" in proc.stderr
    assert str(bad.parent) in proc.stderr
    assert list(torch.load(tmp_path / "ok.pt")) == ["weight", "bias"]  # the earlier save is whole


def _surface(tmp: str) -> list[str]:
    import bmt_zero

    model = bmt_zero.make_distributed(torch.nn.Linear(3, 2))
    seen = []
    bmt_zero.save(model, os.path.join(tmp, "missing", "a.pt"), non_blocking=True)
    try:
        bmt_zero.wait_for_save()
    except Exception as exc:  # every rank gets rank 0's failure
        seen.append(type(exc).__name__)
    bmt_zero.save(model, os.path.join(tmp, "missing", "b.pt"), non_blocking=True)
    try:
        bmt_zero.save(model, os.path.join(tmp, "c.pt"))
    except Exception as exc:
        seen.append(type(exc).__name__)
    bmt_zero.wait_for_save()  # nothing pending, nothing failed: returns
    return seen


@pytest.mark.world_size(2)
def test_failed_background_save_surfaces_at_wait_and_next_save(spawn, tmp_path) -> None:
    results = spawn(_surface, str(tmp_path))
    # every rank raises rank 0's failure as the same OSError type (the store's agreed errors)
    assert results[0] == results[1] == ["FileNotFoundError", "FileNotFoundError"]
