"""Command-line options of the training entry point, checked once, as a frozen dataclass."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from enum import Enum
from typing import Any, NoReturn

import torch

__all__ = ["Precision", "TrainOptions", "OptionError", "parse_options", "DEFAULTS_CPU", "DEFAULTS_GPU"]


class OptionError(ValueError):
    """A bad option or combination of options; the entry point prints it on one line and exits 2."""


class Precision(str, Enum):
    AUTO = "auto"  # bf16 on GPUs, fp32 on CPU
    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"  # with dynamic loss scaling

    def dtype(self, device: torch.device) -> torch.dtype:
        if self is Precision.AUTO:
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        return {Precision.FP32: torch.float32, Precision.BF16: torch.bfloat16, Precision.FP16: torch.float16}[self]


@dataclass(frozen=True)
class TrainOptions:
    model: str = "gpt"
    layers: int | None = None  # None: the device's default (DEFAULTS_CPU / DEFAULTS_GPU)
    hidden: int | None = None
    heads: int | None = None
    batch: int | None = None  # sequences per step of each data-parallel rank (a tp group shares them)
    seq: int | None = None
    steps: int | None = None
    lr: float = 3e-3
    warmup: int = 10
    weight_decay: float = 0.01
    precision: Precision = Precision.AUTO
    offload: bool = False  # AdamOffloadOptimizer: optimizer state and update on the CPU
    checkpointing: bool = True  # recompute each layer's activations in backward
    tp: int = 1
    pipe: int = 1
    save: str = "checkpoints/{model}.pt"  # "" skips saving
    nproc: int | None = None  # processes when launching itself (None: every GPU, else 2 on CPU)
    seed: int = 1234
    micro_batches: int | None = None  # pipeline micro-batches (None: one per stage)
    overwrite: bool = False  # replace an existing checkpoint (and the metrics beside it)
    metrics_dir: str | None = None  # None: beside the checkpoint (see metrics_path); "" writes none
    log_every: int = 10  # steps between plain progress lines when stdout is not a terminal
    init_method: str = "env://"  # the launcher sets a file:// rendezvous for the workers it starts

    def __post_init__(self) -> None:
        if self.model not in ("gpt", "llama"):
            raise OptionError(f"model must be gpt or llama, got {self.model!r}")
        for name in ("layers", "hidden", "heads", "batch", "seq", "steps", "nproc", "micro_batches", "log_every"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise OptionError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if self.tp < 1 or self.pipe < 1:
            raise OptionError(f"--tp ({self.tp}) and --pipe ({self.pipe}) must be >= 1")
        if self.tp > 1 and self.model != "gpt":
            raise OptionError(
                f"--tp {self.tp}: the {self.model} example is written without tensor-parallel layers; "
                "the gpt example uses bmt.nn's (use --model gpt, or --pipe)"
            )
        if self.tp > 1 and self.batch is not None and self.batch % self.tp != 0:
            raise OptionError(f"--batch ({self.batch}) must be divisible by --tp ({self.tp})")
        if self.lr <= 0 or self.warmup < 0:
            raise OptionError(f"--lr ({self.lr}) must be > 0 and --warmup ({self.warmup}) >= 0")

    def resolved(self, device: torch.device) -> TrainOptions:
        """Unset sizes filled with the defaults for ``device`` (small on CPU)."""
        defaults = DEFAULTS_GPU if device.type == "cuda" else DEFAULTS_CPU
        filled: dict[str, Any] = {k: v for k, v in defaults.items() if getattr(self, k) is None}
        return replace(self, **filled)

    @property
    def save_path(self) -> str:
        return self.save.format(model=self.model)

    @property
    def metrics_path(self) -> str:
        """Where the run's metrics go: ``--metrics-dir``, else beside the checkpoint, named after it
        (``checkpoints/gpt.pt`` -> ``checkpoints/gpt-metrics``; ``{model}-metrics`` without one)."""
        if self.metrics_dir is not None:
            return self.metrics_dir.format(model=self.model)
        if not self.save_path:
            return f"{self.model}-metrics"
        return f"{os.path.splitext(self.save_path)[0]}-metrics"


DEFAULTS_CPU = {"layers": 2, "hidden": 128, "heads": 4, "batch": 16, "seq": 64, "steps": 150}
DEFAULTS_GPU = {"layers": 8, "hidden": 512, "heads": 8, "batch": 32, "seq": 256, "steps": 300}


class _DefaultsShown(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows each default, except the unset ones (their help says what they become)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """One line on stderr and exit status 2, as argparse does, without the usage block."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_options(argv: Sequence[str] | None = None) -> TrainOptions:
    p = _Parser(
        prog="bmtrain-train",
        formatter_class=_DefaultsShown,
        description=(
            "Train the example GPT or Llama on a small character-level corpus with BMTrain "
            "(ZeRO-3 blocks, activation checkpointing). Without torchrun it launches itself on "
            "every local GPU with NCCL, else on 2 CPU processes with gloo."
        ),
    )
    p.add_argument("--model", choices=["gpt", "llama"], default="gpt")
    p.add_argument("--layers", type=int, help=f"transformer layers (CPU {DEFAULTS_CPU['layers']}, GPU {DEFAULTS_GPU['layers']})")
    p.add_argument("--hidden", type=int, help=f"hidden size (CPU {DEFAULTS_CPU['hidden']}, GPU {DEFAULTS_GPU['hidden']})")
    p.add_argument("--heads", type=int, help=f"attention heads (CPU {DEFAULTS_CPU['heads']}, GPU {DEFAULTS_GPU['heads']})")
    p.add_argument("--batch", type=int, help=f"sequences per rank and step (CPU {DEFAULTS_CPU['batch']}, GPU {DEFAULTS_GPU['batch']})")
    p.add_argument("--seq", type=int, help=f"sequence length (CPU {DEFAULTS_CPU['seq']}, GPU {DEFAULTS_GPU['seq']})")
    p.add_argument("--steps", type=int, help=f"optimizer steps (CPU {DEFAULTS_CPU['steps']}, GPU {DEFAULTS_GPU['steps']})")
    p.add_argument("--lr", type=float, default=TrainOptions.lr, help="peak learning rate (cosine decay)")
    p.add_argument("--warmup", type=int, default=TrainOptions.warmup, help="warm-up steps")
    p.add_argument("--weight-decay", type=float, default=TrainOptions.weight_decay, help="Adam weight decay")
    p.add_argument("--precision", choices=[x.value for x in Precision], default="auto",
                   help="parameter dtype: auto = bf16 on GPUs, fp32 on CPU; fp16 (GPUs only) adds loss scaling")
    p.add_argument("--offload", action="store_true", help="AdamOffloadOptimizer (optimizer on the CPU)")
    p.add_argument("--no-checkpointing", dest="checkpointing", action="store_false",
                   help="keep activations instead of recomputing them in backward")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (gpt only; --batch is split over it)")
    p.add_argument("--pipe", type=int, default=1, help="pipeline stages (PipelineTransformerBlockList)")
    p.add_argument("--micro-batches", type=int,
                   help="pipeline micro-batches per step (default: one per stage)")
    p.add_argument("--save", default=TrainOptions.save, help="checkpoint path ({model} is replaced); '' skips saving")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing checkpoint and metrics (without it, an existing one is an error)")
    p.add_argument("--metrics-dir",
                   help="per-step metrics (metrics.jsonl, TensorBoard events, curves.png); default: beside "
                        "the checkpoint, e.g. checkpoints/gpt-metrics; '' writes none")
    p.add_argument("--log-every", type=int, default=TrainOptions.log_every,
                   help="steps between progress lines when stdout is not a terminal (a terminal gets a bar)")
    p.add_argument("--nproc", type=int, help="processes when not under torchrun (default: all GPUs, else 2 on CPU)")
    p.add_argument("--seed", type=int, default=TrainOptions.seed, help="seed of the parameters and the data")
    a = p.parse_args(argv)
    try:
        return TrainOptions(
            model=a.model, layers=a.layers, hidden=a.hidden, heads=a.heads, batch=a.batch, seq=a.seq,
            steps=a.steps, lr=a.lr, warmup=a.warmup, weight_decay=a.weight_decay,
            precision=Precision(a.precision), offload=a.offload, checkpointing=a.checkpointing,
            tp=a.tp, pipe=a.pipe, micro_batches=a.micro_batches, save=a.save, overwrite=a.overwrite,
            metrics_dir=a.metrics_dir, log_every=a.log_every, nproc=a.nproc, seed=a.seed,
        )
    except OptionError as e:
        p.error(str(e))
