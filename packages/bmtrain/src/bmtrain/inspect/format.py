"""``format_summary``: the table BMTrain 1.0.1 prints for ``get_summary`` / ``inspect_model``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["format_summary"]

_COLUMNS = ("name", "shape", "max", "min", "std", "mean", "grad_std", "grad_mean")
_WIDTH = {"shape": 20}  # name: longest name + 4; the rest: 10
_NUMBER_WIDTH = 10


def _cell(value: Any, width: int) -> str:
    text = f"{value:.4f}" if isinstance(value, float) else str(value)
    return " " + text.ljust(width)[:width]


def format_summary(summary: Sequence[Mapping[str, Any]]) -> str:
    """A header and one row per entry; floats as ``%.4f``, other values with ``str()``.

    Column widths: name = longest name + 4, shape = 20, the numbers = 10; each cell is a space
    then the value, left-aligned and cut to the width.
    """
    widths = {
        "name": max([len("name")] + [len(str(item["name"])) for item in summary]) + 4,
        **_WIDTH,
    }
    lines = ["".join(_cell(col, widths.get(col, _NUMBER_WIDTH)) for col in _COLUMNS)]
    for item in summary:
        lines.append("".join(_cell(item[col], widths.get(col, _NUMBER_WIDTH)) for col in _COLUMNS))
    return "\n".join(lines)
