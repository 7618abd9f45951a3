"""The READMEs' examples run as written, on 2 CPU processes under torchrun (gloo, a free port chosen
by --standalone): each component package's example, and the top-level README's BMTrain-style
quickstart, which is what a user copies first."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
# package -> the lines rank 0 prints (regexes)
EXPECTED = {
    "bmt-comm": r"^world of 2 on cpu, tp size 1\nmean loss 2\.0\n",
    "bmt-zero": r"^rank 0 holds 1024 of 2048 elements\n",
    # 4 layers of 64x256 + 256 + 256x64 + 64; rank 0's half of each layer's aligned buffer is "up"
    "bmt-ckpt": r"^rank 0 holds 66560 of 132352 parameter elements\n",
    "bmt-optim": r"^loss 0\.[0-9]+, lr 2\.24e-04\n",
}


def _python_blocks(readme: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", readme.read_text(), re.S)


def _run_on_two_processes(code: str, cwd: Path) -> str:
    script = cwd / "example.py"
    script.write_text(code)
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)],
        capture_output=True, text=True, cwd=cwd, env=env, timeout=180,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    return proc.stdout


@pytest.mark.parametrize("package", sorted(EXPECTED))
def test_package_readme_example(package: str, tmp_path: Path) -> None:
    blocks = _python_blocks(ROOT / "packages" / package / "README.md")
    assert len(blocks) == 1, f"{package}/README.md should have one python example, has {len(blocks)}"
    out = _run_on_two_processes(blocks[0], tmp_path)
    assert re.search(EXPECTED[package], out, re.M), out


def test_quickstart_trains_and_saves(tmp_path: Path) -> None:
    (block,) = _python_blocks(ROOT / "README.md")
    out = _run_on_two_processes(block, tmp_path)
    losses = [float(v) for v in re.findall(r"^step \d+ loss ([0-9.]+) lr ", out, re.M)]
    assert len(losses) == 5 and losses[-1] < losses[0] - 1.0, out  # copying the input is learnt
    state = torch.load(tmp_path / "model.pt", map_location="cpu", weights_only=True)
    assert state["embed"].shape == (64, 128) and state["layers.3.w_out"].shape == (128, 512)
