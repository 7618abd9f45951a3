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


def _train(args: list[str], cwd: Path, gpus: bool = False, nproc: int = 2) -> tuple[float, float, str]:
    env = dict(os.environ)
    if not gpus:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU path: 2 processes on gloo
    proc = subprocess.run(
        [sys.executable, "-m", "bmtrain.examples.train", *args],
        capture_output=True, text=True, cwd=cwd, env=env, timeout=240,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    first = re.search(r"^first loss: ([0-9.]+)$", proc.stdout, re.M)
    final = re.search(r"^final loss: ([0-9.]+)$", proc.stdout, re.M)
    assert first and final, proc.stdout
    assert f"{nproc} processes" in proc.stdout, proc.stdout
    assert "tok/s" in proc.stdout  # stdout is not a terminal: plain progress lines, no bar
    if gpus:
        assert "MFU" in proc.stdout and "GiB" in proc.stdout, proc.stdout[-2000:]
    return float(first.group(1)), float(final.group(1)), proc.stdout


def _parameters(out: str) -> int:
    """The whole model's parameter count, from the run's first line."""
    found = re.search(r"M parameters \(([0-9,]+)\)", out)
    assert found, out
    return int(found.group(1).replace(",", ""))


def _gpt_parameters(vocab: int, seq: int, layers: int, c: int) -> int:
    """wte + wpe + per layer (2 LayerNorms, q/k/v/proj with biases, the 4x MLP) + ln_f."""
    layer = 2 * 2 * c + 4 * (c * c + c) + (c * 4 * c + 4 * c) + (4 * c * c + c)
    return vocab * c + seq * c + layers * layer + 2 * c


def _llama_parameters(vocab: int, layers: int, c: int, heads: int) -> int:
    """Embedding + per layer (2 RMSNorms, GQA projections, SwiGLU) + norm + output layer."""
    kv, hs, ffn = max(1, heads // 2), c // heads, (8 * c // 3 + 31) // 32 * 32
    layer = 2 * c + c * c + 2 * c * kv * hs + c * c + 3 * c * ffn
    return vocab * c + layers * layer + c + c * vocab


def test_gpt_trains_on_two_cpu_processes_and_saves(tmp_path: Path) -> None:
    first, final, out = _train([*SMALL, "--save", "ckpt/{model}.pt"], tmp_path)
    assert final < first - 0.5, out  # from ~ln(vocab) = 4.2 to ~3 in 40 steps
    assert _parameters(out) == _gpt_parameters(vocab=64, seq=32, layers=1, c=64)
    # a plain line every --log-every (default 10) steps, then where the metrics went
    assert re.findall(r"^step (\d+)/40 \| loss", out, re.M) == ["10", "20", "30", "40"], out
    assert "metrics: ckpt/gpt-metrics/metrics.jsonl" in out, out  # the default: beside the checkpoint
    assert (tmp_path / "ckpt" / "gpt-metrics" / "curves.png").exists()
    state = torch.load(tmp_path / "ckpt" / "gpt.pt", map_location="cpu", weights_only=True)
    expected = {  # keys and shapes of the unwrapped model; the vocabulary is padded to 64
        "wte.weight": (64, 64), "wpe": (32, 64), "ln_f.weight": (64,),
        "layers.0.attn.q.weight": (64, 64), "layers.0.attn.proj.bias": (64,), "layers.0.mlp.fc.weight": (256, 64),
    }
    for key, shape in expected.items():
        assert tuple(state[key].shape) == shape, key
    assert not any(k.startswith("layers.1.") for k in state)


def test_gpt_trains_tensor_parallel_with_the_offloaded_optimizer(tmp_path: Path) -> None:
    first, final, out = _train([*SMALL, "--tp", "2", "--offload", "--save", ""], tmp_path)
    assert final < first - 0.5, out
    assert "tensor parallel 2" in out and "offloaded" in out
    assert not (tmp_path / "checkpoints").exists()


def test_gpt_trains_with_tensor_and_pipeline_parallelism_on_four_processes(tmp_path: Path) -> None:
    """tp 2 x pipe 2 on 4 gloo ranks: ZeRO within each (stage, tp rank) group, vocab-parallel loss."""
    args = ["--nproc", "4", "--tp", "2", "--pipe", "2", *SMALL, "--layers", "2", "--save", "tp_pp.pt"]
    first, final, out = _train(args, tmp_path, nproc=4)
    assert final < first - 0.5, out
    assert "pipeline 2 x tensor parallel 2" in out, out
    assert _parameters(out) == _gpt_parameters(vocab=64, seq=32, layers=2, c=64)  # both stages' layers
    state = torch.load(tmp_path / "tp_pp.pt", map_location="cpu", weights_only=True)
    assert {"layers.0.attn.q.weight", "layers.1.mlp.fc.weight"} <= set(state), sorted(state)


def test_llama_trains_pipelined(tmp_path: Path) -> None:
    first, final, out = _train(["--model", "llama", "--pipe", "2", *SMALL, "--layers", "2", "--save", "x.pt"], tmp_path)
    assert final < first - 0.5, out
    assert "pipeline 2" in out
    from bmtrain.examples.data import CharCorpus

    vocab = CharCorpus.packaged().vocab_size
    assert _parameters(out) == _llama_parameters(vocab=vocab, layers=2, c=64, heads=2)  # the whole model
    state = torch.load(tmp_path / "x.pt", map_location="cpu", weights_only=True)
    assert {"layers.0.attention.wq.weight", "layers.1.feed_forward.w2.weight", "output.weight"} <= set(state)


@pytest.mark.gpus(2)
def test_gpt_trains_on_two_gpus_with_nccl(tmp_path: Path) -> None:
    """The same code on 2 GPUs: NCCL, bf16 by default, MFU and peak memory in the bar."""
    first, final, out = _train(["--nproc", "2", *SMALL, "--save", "g.pt"], tmp_path, gpus=True)
    assert final < first - 0.5, out
    assert "on cuda" in out and "torch.bfloat16" in out, out
    assert (tmp_path / "g.pt").exists()


def test_options_are_checked() -> None:
    from bmtrain.examples.options import DEFAULTS_CPU, OptionError, Precision, TrainOptions, parse_options

    opts = parse_options(["--model", "llama", "--layers", "3", "--precision", "bf16", "--offload"])
    assert (opts.model, opts.layers, opts.precision, opts.offload) == ("llama", 3, Precision.BF16, True)
    filled = opts.resolved(torch.device("cpu"))
    assert filled.layers == 3 and filled.hidden == DEFAULTS_CPU["hidden"] and filled.steps == DEFAULTS_CPU["steps"]
    assert Precision.AUTO.dtype(torch.device("cpu")) is torch.float32
    assert Precision.AUTO.dtype(torch.device("cuda")) is torch.bfloat16
    assert TrainOptions(save="out/{model}.pt").save_path == "out/gpt.pt"
    assert TrainOptions(save="out/{model}.pt").metrics_path == "out/gpt-metrics"
    assert TrainOptions(save="").metrics_path == "gpt-metrics"
    assert TrainOptions(metrics_dir="m/{model}").metrics_path == "m/gpt"
    with pytest.raises(OptionError, match="layers"):
        TrainOptions(layers=0)
    with pytest.raises(ValueError, match="tensor-parallel"):
        TrainOptions(model="llama", tp=2)
    with pytest.raises(ValueError, match="divisible"):
        TrainOptions(tp=4, batch=6)
    with pytest.raises(SystemExit):
        parse_options(["--model", "bert"])
