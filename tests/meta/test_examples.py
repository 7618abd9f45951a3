"""The README's main command, run small: 2 CPU processes on gloo, the loss falls, a checkpoint is saved."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SMALL = ["--steps", "40", "--layers", "1", "--hidden", "64", "--heads", "2", "--batch", "8", "--seq", "32"]


def _train(args: list[str], cwd: Path) -> tuple[float, float, str]:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # the CPU path: 2 processes on gloo
    proc = subprocess.run(
        [sys.executable, "-m", "bmtrain.examples.train", *args],
        capture_output=True, text=True, cwd=cwd, env=env, timeout=240,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    first = re.search(r"^first loss: ([0-9.]+)$", proc.stdout, re.M)
    final = re.search(r"^final loss: ([0-9.]+)$", proc.stdout, re.M)
    assert first and final, proc.stdout
    assert "2 processes" in proc.stdout, proc.stdout
    assert "tok/s" in proc.stderr  # the progress bar
    return float(first.group(1)), float(final.group(1)), proc.stdout


def test_gpt_trains_on_two_cpu_processes_and_saves(tmp_path: Path) -> None:
    first, final, out = _train([*SMALL, "--save", "ckpt/{model}.pt"], tmp_path)
    assert final < first - 0.5, out  # from ~ln(vocab) = 3.8 to ~2.5 in 40 steps
    state = torch.load(tmp_path / "ckpt" / "gpt.pt", map_location="cpu", weights_only=True)
    vocab = state["wte.weight"].shape[0]
    expected = {
        "wte.weight": (vocab, 64), "wpe": (32, 64), "ln_f.weight": (64,),
        "layers.0.attn.qkv.weight": (192, 64), "layers.0.mlp.fc.weight": (256, 64),
    }
    for key, shape in expected.items():
        assert tuple(state[key].shape) == shape, key
    assert not any(k.startswith("layers.1.") for k in state)


def test_llama_trains_with_the_offloaded_optimizer(tmp_path: Path) -> None:
    first, final, out = _train(["--model", "llama", "--offload", *SMALL, "--save", ""], tmp_path)
    assert final < first - 0.5, out
    assert "offloaded" in out
    assert not (tmp_path / "checkpoints").exists()


def test_options_are_checked() -> None:
    from bmtrain.examples.options import DEFAULTS_CPU, Precision, TrainOptions, parse_options

    opts = parse_options(["--model", "llama", "--layers", "3", "--precision", "bf16", "--offload"])
    assert (opts.model, opts.layers, opts.precision, opts.offload) == ("llama", 3, Precision.BF16, True)
    filled = opts.resolved(torch.device("cpu"))
    assert filled.layers == 3 and filled.hidden == DEFAULTS_CPU["hidden"] and filled.steps == DEFAULTS_CPU["steps"]
    assert Precision.AUTO.dtype(torch.device("cpu")) is torch.float32
    assert Precision.AUTO.dtype(torch.device("cuda")) is torch.bfloat16
    assert TrainOptions(save="out/{model}.pt").save_path == "out/gpt.pt"
    with pytest.raises(ValueError, match="layers"):
        TrainOptions(layers=0)
    with pytest.raises(ValueError, match="tensor-parallel"):
        TrainOptions(tp=2)
    with pytest.raises(SystemExit):
        parse_options(["--model", "bert"])
