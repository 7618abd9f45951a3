"""benchmarks/train: the yardstick has the sizes the benchmark's MFU assumes (built on meta)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks" / "train"))

from bench_train import _options, _worker_argv  # noqa: E402
from yardstick import CONFIGS, Yardstick, flops_per_token, parameter_count  # noqa: E402


@pytest.mark.parametrize(("config", "billions"), [("1b", 1.26), ("7b", 6.74)])
def test_yardstick_sizes(config, billions):
    cfg = CONFIGS[config]
    with torch.device("meta"):
        model = Yardstick(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert n == parameter_count(cfg)
    assert round(n / 1e9, 2) == billions
    embedding = cfg.vocab * cfg.dim
    assert flops_per_token(cfg) == 6 * (n - embedding) + 12 * cfg.layers * cfg.dim * cfg.seq


def test_workers_get_the_parents_settings_but_not_its_output_file():
    args = _options(["--config", "7b", "--accum", "2", "--no-guard", "--impls", "bmt", "--out", "x.jsonl",
                     "--ckpt", "selective", "--compile", "--clip", "0.5"])
    again = _options(_worker_argv(args))
    for key in ("config", "mb", "accum", "ckpt", "compile", "offload", "no_guard", "clip", "steps", "warmup", "impls"):
        assert getattr(again, key) == getattr(args, key), key
    assert again.out is None and args.mb == 2


def test_bad_options_are_refused(capsys):
    with pytest.raises(SystemExit) as exc:
        _options(["--impls", "plain,deepspeed"])
    assert exc.value.code == 2 and "deepspeed" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        _options(["--clip", "0"])
    assert exc.value.code == 2 and "--clip must be > 0, got 0.0" in capsys.readouterr().err


def test_guarded_lazy_offload_with_clip_is_accepted():
    args = _options(["--config", "7b", "--impls", "bmt", "--offload", "lazy", "--clip", "1.0"])
    assert args.offload == "lazy" and not args.no_guard and args.clip == 1.0
