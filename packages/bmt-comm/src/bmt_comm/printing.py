"""The reference's printing and bookkeeping helpers (``bmt.print_rank`` and friends).

``__all__`` is the one list of these names: ``bmt_comm``, ``bmt_comm.utils`` and ``bmtrain.utils``
re-export it.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

import torch

from .context import get_context, is_initialized

__all__ = ["print_rank", "print_block", "print_dict", "see_memory", "AverageRecorder", "round_up"]


def round_up(x: int, d: int) -> int:
    return (x + d - 1) // d * d


def print_rank(*args: Any, rank: int = 0, **kwargs: Any) -> None:
    """``print`` on global rank ``rank`` only."""
    if (get_context().rank if is_initialized() else 0) == rank:
        print(*args, **kwargs)


def print_block(title: str, content: str | None = None, file: TextIO = sys.stdout) -> None:
    """A 60-wide ``=== title ===`` rule, then ``content``."""
    left = (58 - len(title)) // 2
    right = 58 - len(title) - left
    print("=" * left + " " + title + " " + "=" * right, file=file)
    if content is not None:
        print(content, file=file)


def print_dict(title: str, content: dict[str, Any], file: TextIO = sys.stdout) -> None:
    """Keys in a column ``round_up(longest + 3, 4)`` wide, values wrapped to the 60-column block."""
    width = round_up(max((len(k) for k in content), default=0) + 3, 4)
    value_width = max(1, 60 - width)
    lines = []
    for key, value in content.items():
        text = str(value)
        head = (key + " :").ljust(width)
        chunks = [text[i : i + value_width] for i in range(0, len(text), value_width)] or [""]
        lines.append(head + chunks[0])
        lines.extend(" " * width + c for c in chunks[1:])
    print_block(title, "\n".join(lines), file=file)


def see_memory(message: str, detail: bool = False) -> None:
    """Rank 0 prints ``message`` and CUDA memory in GiB (or the full summary); peaks are reset."""
    if not torch.cuda.is_available():
        print_rank(f"{message}\n  (no CUDA device: nothing to report)")
        return
    if detail:
        print_rank(torch.cuda.memory_summary())
    else:
        gib = 1024**3
        print_rank(
            f"{message}\n  allocated: {torch.cuda.memory_allocated() / gib:.2f} GiB\n"
            f"  max allocated: {torch.cuda.max_memory_allocated() / gib:.2f} GiB"
        )
    torch.cuda.reset_peak_memory_stats()


class AverageRecorder:
    """Exponential moving average with bias correction: ``value / (1 - alpha**steps)``."""

    def __init__(self, alpha: float = 0.9, start_value: float = 0) -> None:
        self._alpha = alpha
        self._value = start_value
        self._steps = 0

    def record(self, v: float) -> None:
        self._value = self._alpha * self._value + (1 - self._alpha) * v
        self._steps += 1

    @property
    def value(self) -> float:
        if self._steps <= 0:
            return self._value
        return self._value / (1 - self._alpha**self._steps)
