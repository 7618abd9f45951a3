"""``python -m bmtrain.examples.train`` / ``bmtrain-train``: train the example GPT or Llama.

    python -m bmtrain.examples.train                      # 2 CPU processes, or every GPU
    python -m bmtrain.examples.train --model llama --steps 300 --precision bf16
    torchrun --nproc_per_node=8 -m bmtrain.examples.train --layers 12 --hidden 768

Prints a progress bar (loss, tokens/s and, on GPUs, MFU and peak memory), the first and final
loss, and saves a checkpoint (``bmt.save``) at the end.
"""

from __future__ import annotations

from collections.abc import Sequence

from .launch import launch
from .options import parse_options

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> None:
    launch(parse_options(argv))


if __name__ == "__main__":
    main()
