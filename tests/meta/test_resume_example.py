"""examples/resume.py, as a user runs it: a run stopped at step 6 and started again resumes from
its step-4 checkpoint and prints bitwise the losses of the run that was never stopped."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "resume.py"


def _run(ckpt: Path, *extra: str) -> dict[int, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["CUDA_VISIBLE_DEVICES"] = ""  # gloo on the CPU, as CI runs it
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(EXAMPLE),
           "--dir", str(ckpt), "--steps", "10", "--save-every", "4", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return {int(m[1]): m[2] for m in re.finditer(r"^step (\d+) loss (\S+)$", proc.stdout, re.MULTILINE)}


def test_a_stopped_run_resumes_bitwise(tmp_path):
    whole = _run(tmp_path / "whole")
    assert sorted(whole) == list(range(1, 11))
    first = _run(tmp_path / "cut", "--stop-at", "6")
    assert sorted(first) == list(range(1, 7))
    second = _run(tmp_path / "cut")
    assert sorted(second) == list(range(5, 11))  # from the step-4 checkpoint; step 8's came later
    assert {**first, **second} == whole
    assert len(set(whole.values())) == len(whole)  # the losses change: the model trains
    assert sorted(os.listdir(tmp_path / "cut")) == ["latest", "step-00000004", "step-00000008"]
