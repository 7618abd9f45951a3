"""BMTrain 1.0.1's ``bmtrain.benchmark.utils``: its size labels (``1.00KB``, cut to 6 characters)."""

__all__ = ["format_size", "format_size_"]


def format_size_(x: int) -> str:
    """``x`` bytes as ``"512B"``, ``"1.50KB"``, ``"2.00MB"`` or ``"4.00GB"`` (1024-based)."""
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if x >= scale:
            return f"{x / scale:4.2f}{unit}"
    return f"{x:d}B"


def format_size(x: int) -> str:
    """:func:`format_size_` cut to its first 6 characters (``"1000.00MB"`` -> ``"1000.0"``)."""
    return format_size_(x)[:6]
