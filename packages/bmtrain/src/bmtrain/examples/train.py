"""``python -m bmtrain.examples.train`` / ``bmtrain-train``: train the example GPT or Llama.

    python -m bmtrain.examples.train                      # 2 CPU processes, or every GPU
    python -m bmtrain.examples.train --model llama --steps 300 --precision bf16
    torchrun --nproc_per_node=8 -m bmtrain.examples.train --layers 12 --hidden 768

Prints progress (a bar on a terminal, else a line every ``--log-every`` steps: loss, lr, grad
norm, tokens/s and, on GPUs, MFU and peak memory), the first and final loss, saves a checkpoint
(``bmt.save``) and writes the per-step metrics (``metrics.jsonl``, TensorBoard events,
``curves.png``) beside it. Exit status: 0; 2 for a bad option (one line on stderr, before any
worker starts); 1 when a worker fails; 128 + the signal number when SIGINT/SIGTERM stopped it.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Sequence

from .options import OptionError, TrainOptions, parse_options

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> None:
    opts = parse_options(argv)  # before importing the training code: --help and typos answer at once
    from .launch import Interrupted, WorkerFailed, launch

    try:
        launch(opts)
    except OptionError as e:
        if os.environ.get("LOCAL_RANK", "0") == "0":  # under torchrun every rank finds the same error
            print(f"bmtrain-train: error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except WorkerFailed as e:
        print(f"bmtrain-train: {e}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    except Interrupted as e:
        print(f"bmtrain-train: {e}", file=sys.stderr, flush=True)
        if e.signum == signal.SIGINT:  # Ctrl-C: someone is watching; SIGTERM: a scheduler wants us gone now
            _plot_partial(opts)
        raise SystemExit(128 + e.signum) from None


def _plot_partial(opts: TrainOptions) -> None:
    """The curves of the steps an interrupted run got through."""
    from .run_metrics import METRICS_FILE, PLOT_FILE, missing_plot_packages, plot_curves

    jsonl = os.path.join(opts.metrics_path, METRICS_FILE) if opts.metrics_path else ""
    if jsonl and os.path.exists(jsonl) and "matplotlib" not in missing_plot_packages():
        png = plot_curves(jsonl, os.path.join(opts.metrics_path, PLOT_FILE))
        print(f"metrics so far: {jsonl}, {png}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
