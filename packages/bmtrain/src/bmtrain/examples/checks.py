"""Every option checked in the launching process, before any worker starts.

:func:`check_options` fills the device's default sizes and checks what needs the world size and
the device (divisibility of the parallel layout, the batch against the micro-batches, the model
shape, the precision); :func:`check_outputs` checks that the checkpoint and the metrics can be
written and would not replace a previous run's without ``--overwrite``. Both raise
:class:`OptionError`, which the entry point prints as one line before exiting with status 2.
"""

from __future__ import annotations

import os
import tempfile

import torch

from .data import CharCorpus
from .options import OptionError, Precision, TrainOptions
from .run_metrics import METRICS_FILE, PLOT_FILE, is_event_file, missing_plot_packages

__all__ = ["check_options", "check_outputs"]


def check_options(opts: TrainOptions, world_size: int, device: torch.device) -> TrainOptions:
    """``opts`` with the device's default sizes filled in, once every rule holds for them."""
    o = opts.resolved(device)
    assert o.layers and o.hidden and o.heads and o.batch and o.seq  # filled by resolved()
    tp, pipe = o.tp, o.pipe
    if world_size % (tp * pipe) != 0:
        raise OptionError(
            f"the number of processes ({world_size}) must be divisible by --tp x --pipe ({tp} x {pipe} = {tp * pipe})"
        )
    if o.batch % tp != 0:
        raise OptionError(f"--batch ({o.batch}) must be divisible by --tp ({tp})")
    if o.micro_batches is not None and pipe == 1:
        raise OptionError(f"--micro-batches ({o.micro_batches}) needs a pipeline (--pipe > 1)")
    rows = o.batch // tp * pipe  # the sequences one pipe group feeds through the stages per step
    micros = o.micro_batches or pipe
    if rows < micros:
        raise OptionError(
            f"{micros} pipeline micro-batches (--micro-batches, default --pipe) need at least {micros} sequences "
            f"per pipe group, got --batch / --tp x --pipe = {o.batch} / {tp} x {pipe} = {rows}"
        )
    if o.hidden % o.heads != 0:
        raise OptionError(f"--hidden ({o.hidden}) must be divisible by --heads ({o.heads})")
    if o.heads % tp != 0:
        raise OptionError(f"--heads ({o.heads}) must be divisible by --tp ({tp}): each rank computes whole heads")
    if o.layers < pipe:
        raise OptionError(f"--layers ({o.layers}) must be at least --pipe ({pipe}): one layer per stage or more")
    if o.model == "llama":
        kv = max(1, o.heads // 2)
        if o.heads % kv != 0:
            raise OptionError(f"--heads ({o.heads}) must be divisible by llama's key/value heads "
                              f"(--heads // 2 = {kv}, grouped-query attention)")
        if (o.hidden // o.heads) % 2 != 0:
            raise OptionError(f"--hidden / --heads ({o.hidden} / {o.heads}) must be even for llama's rotary embeddings")
    corpus_len = len(CharCorpus.packaged().text)
    if o.seq >= corpus_len:
        raise OptionError(f"--seq ({o.seq}) must be below the corpus length ({corpus_len} characters)")
    _check_precision(o.precision, device)
    if device.type == "cuda" and "WORLD_SIZE" not in os.environ and world_size > torch.cuda.device_count():
        raise OptionError(f"--nproc ({world_size}) is more than the GPUs visible here ({torch.cuda.device_count()})")
    return o


def _check_precision(precision: Precision, device: torch.device) -> None:
    if device.type == "cpu" and precision is Precision.FP16:
        raise OptionError("--precision fp16 needs a GPU (loss-scaled fp16 is not supported on CPU): use fp32 or bf16")
    if device.type == "cuda" and precision.dtype(device) is torch.bfloat16 and not torch.cuda.is_bf16_supported():
        name = torch.cuda.get_device_name(device.index or 0)
        raise OptionError(f"--precision {precision.value} means bf16, which {name} does not support: use fp16 or fp32")


def check_outputs(o: TrainOptions) -> None:
    """The checkpoint and metrics paths can be written, and hold no previous run's files (unless
    ``--overwrite``). Only the rank that writes them (rank 0) calls it."""
    if o.save_path:
        path = o.save_path
        if os.path.isdir(path):
            raise OptionError(f"--save {path!r} is a directory; give a file path")
        if os.path.exists(path) and not o.overwrite:
            raise OptionError(f"--save {path!r} exists: pass --overwrite to replace it, or another --save")
        _check_writable("--save", path, os.path.dirname(os.path.abspath(path)))
    d = o.metrics_path
    if d:
        if os.path.exists(d) and not os.path.isdir(d):
            raise OptionError(f"--metrics-dir {d!r} is a file; give a directory")
        previous = _previous_metrics(d)
        if previous and not o.overwrite:
            raise OptionError(
                f"--metrics-dir {d!r} holds a previous run's metrics ({previous[0]}): pass --overwrite, "
                "or another --metrics-dir"
            )
        _check_writable("--metrics-dir", d, os.path.abspath(d))
        missing = missing_plot_packages()
        if missing and o.metrics_dir is not None:
            raise OptionError(
                f"--metrics-dir needs {' and '.join(missing)} for the TensorBoard events and the plot: "
                "pip install 'bmtrain[train]' (or --metrics-dir '' to write none)"
            )


def _previous_metrics(d: str) -> list[str]:
    if not os.path.isdir(d):
        return []
    return sorted(n for n in os.listdir(d) if n in (METRICS_FILE, PLOT_FILE) or is_event_file(n))


def _check_writable(flag: str, path: str, directory: str) -> None:
    """Probe with a temporary file in ``directory``, or in its nearest existing parent (nothing
    is created there: the run makes the directories when it writes)."""
    existing = directory
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise OptionError(f"{flag} {path!r} cannot be written: {existing!r} is not a directory")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise OptionError(f"{flag} {path!r} cannot be written: {e.strerror} ({existing})") from None
