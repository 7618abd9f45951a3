"""Per-step metrics of a training run, written by rank 0, and its progress display.

In the metrics directory: ``metrics.jsonl`` (one :class:`StepRecord` per line), TensorBoard
events (``tensorboard --logdir DIR``) and, at the end, ``curves.png`` (loss and throughput over
the steps). TensorBoard and matplotlib are optional (``pip install 'bmtrain[train]'``); without
them only the JSON-lines file is written. On a terminal the progress is a tqdm bar on stderr;
otherwise (a log file, CI) one plain line on stdout every ``--log-every`` steps.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import resource
import sys
from dataclasses import asdict, dataclass
from typing import Any

from tqdm import tqdm

__all__ = [
    "METRICS_FILE", "PLOT_FILE", "StepRecord", "MetricsWriter", "Progress", "is_event_file",
    "missing_plot_packages", "plot_curves", "read_records", "peak_rss_gib",
]

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "curves.png"
_EVENTS_PREFIX = "events.out.tfevents."  # TensorBoard's event file names
_INSTALL_HINT = "pip install 'bmtrain[train]'"


def is_event_file(name: str) -> bool:
    return name.startswith(_EVENTS_PREFIX)


def missing_plot_packages() -> list[str]:
    """The optional packages (TensorBoard, matplotlib) that are not installed."""
    return [name for name in ("tensorboard", "matplotlib") if importlib.util.find_spec(name) is None]


def peak_rss_gib() -> float:
    """Peak resident memory of this process in GiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**30 if sys.platform == "darwin" else 2**20)


@dataclass(frozen=True)
class StepRecord:
    """One optimizer step, as rank 0 saw it."""

    step: int  # 1-based
    loss: float  # the mean over ranks
    lr: float  # the learning rate this step used
    loss_scale: float  # OptimManager's loss scale in this step's backward (1.0 without loss scaling)
    grad_norm: float  # the unscaled global gradient norm, before clipping
    skipped: bool  # inf/nan gradients: the optimizer step was skipped
    tokens_per_s: float  # the step's tokens (all data-parallel ranks) over its wall time
    mfu: float | None  # 6 * parameters * tokens/s over the GPUs' bf16 peak; None on CPU or an unknown GPU
    memory_gib: float | None  # peak CUDA memory allocated by rank 0; None on CPU
    rss_gib: float  # peak resident memory of rank 0's process
    elapsed_s: float  # since the first step began

    def to_json(self) -> str:
        """One JSON object; inf and nan (a skipped step's norm) are written as null (strict JSON)."""
        fields = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}
        return json.dumps(fields)

    def line(self, total: int) -> str:
        """The plain progress line (``step 10/150 | loss 3.1234 | ...``)."""
        parts = [f"step {self.step}/{total}", *self._figures()]
        return " | ".join(parts)

    def _figures(self) -> list[str]:
        parts = [f"loss {self.loss:.4f}", f"lr {self.lr:.2e}", f"grad norm {self.grad_norm:.3f}"]
        if self.loss_scale != 1.0:
            parts.append(f"scale {self.loss_scale:g}")
        if self.skipped:
            parts.append("skipped")
        parts.append(f"{self.tokens_per_s:,.0f} tok/s")
        if self.memory_gib is not None:  # on GPUs
            parts.append(f"MFU {self.mfu:.1%}" if self.mfu is not None else "MFU unknown")
            parts.append(f"mem {self.memory_gib:.2f} GiB")
        return parts


class Progress:
    """A tqdm bar on stderr when stdout is a terminal; otherwise a plain line on stdout every
    ``log_every`` steps and at the last one. Silent where ``enabled`` is false (ranks but 0)."""

    def __init__(self, total: int, log_every: int, enabled: bool) -> None:
        self.total, self.log_every, self.enabled = total, log_every, enabled
        self.bar: Any = None
        if enabled and sys.stdout.isatty():
            self.bar = tqdm(total=total, file=sys.stderr, dynamic_ncols=True, mininterval=0.5)

    def update(self, rec: StepRecord) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix_str(", ".join(rec._figures()), refresh=False)
            self.bar.update(1)
        elif rec.step % self.log_every == 0 or rec.step == self.total:
            print(rec.line(self.total), flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class MetricsWriter:
    """``metrics.jsonl`` and TensorBoard events in ``directory``, one record per step; the plot
    at :meth:`close`. ``overwrite`` first removes a previous run's files there."""

    def __init__(self, directory: str, overwrite: bool) -> None:
        self.directory = directory
        os.makedirs(directory, exist_ok=True)
        if overwrite:
            for name in os.listdir(directory):
                if name in (METRICS_FILE, PLOT_FILE) or is_event_file(name):
                    os.remove(os.path.join(directory, name))
        self.jsonl_path = os.path.join(directory, METRICS_FILE)
        self._jsonl = open(self.jsonl_path, "w", encoding="utf-8", buffering=1)  # a line per step, flushed
        self.missing = missing_plot_packages()
        self._tb: Any = None
        if "tensorboard" not in self.missing:
            tensorboard = importlib.import_module("torch.utils.tensorboard")
            self._tb = tensorboard.SummaryWriter(log_dir=directory, flush_secs=10)  # an interrupted run keeps most

    def note(self) -> str | None:
        """Why only some files are written, for the run's log (None when all are)."""
        if not self.missing:
            return None
        return f"metrics: {' and '.join(self.missing)} not installed ({_INSTALL_HINT}): writing {METRICS_FILE} only"

    def write(self, rec: StepRecord) -> None:
        self._jsonl.write(rec.to_json() + "\n")
        if self._tb is None:
            return
        scalars = {
            "train/loss": rec.loss, "train/lr": rec.lr, "train/loss_scale": rec.loss_scale,
            "train/grad_norm": rec.grad_norm, "perf/tokens_per_s": rec.tokens_per_s, "perf/mfu": rec.mfu,
            "perf/memory_gib": rec.memory_gib, "perf/rss_gib": rec.rss_gib,
        }
        for tag, value in scalars.items():
            if value is not None:
                self._tb.add_scalar(tag, value, rec.step)

    def close(self) -> list[str]:
        """Flush, close and plot; the paths written, the directory of the events included."""
        self._jsonl.close()
        written = [self.jsonl_path]
        if self._tb is not None:
            self._tb.close()
            written.append(f"TensorBoard events (tensorboard --logdir {self.directory})")
        if "matplotlib" not in self.missing:
            written.append(plot_curves(self.jsonl_path, os.path.join(self.directory, PLOT_FILE)))
        return written


def read_records(path: str) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``, in order (a line cut short by a killed run is left out)."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def plot_curves(jsonl_path: str, png_path: str) -> str:
    """Loss and tokens/s over the steps of ``jsonl_path`` as a PNG (matplotlib's Agg canvas,
    no display or global pyplot state). Returns ``png_path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = read_records(jsonl_path)
    steps = [r["step"] for r in records]
    fig = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(fig)
    loss_ax, speed_ax = fig.subplots(1, 2)
    loss_ax.plot(steps, [r["loss"] if r["loss"] is not None else math.nan for r in records])
    loss_ax.set(title="loss", xlabel="step", ylabel="cross-entropy")
    speed_ax.plot(steps, [r["tokens_per_s"] for r in records])
    speed_ax.set(title="throughput", xlabel="step", ylabel="tokens/s")
    for ax in (loss_ax, speed_ax):
        ax.grid(alpha=0.3)
    fig.savefig(png_path, dpi=100)
    return png_path
