"""``bmtrain.debug``: a process-wide scratch dictionary for debugging values across modules.

``set`` stores tensors detached and on the CPU (a snapshot that later in-place updates don't
change); ``append`` / ``extend`` keep lists and store items as given.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

__all__ = ["set", "get", "clear", "append", "extend", "DEBUG_VARS"]

DEBUG_VARS: dict[str, Any] = {}  # 1.0.1's name; clear() empties it in place


def set(key: str, value: Any) -> None:  # shadows the builtin: the 1.0.1 name
    """Store ``value`` under ``key``; a tensor is stored as a detached CPU copy."""
    if isinstance(value, torch.Tensor):
        value = value.detach().to("cpu", copy=True)
    DEBUG_VARS[key] = value


def get(key: str, default: Any = None) -> Any:
    """The value stored under ``key``, or ``default``."""
    return DEBUG_VARS.get(key, default)


def clear(key: str | None = None) -> None:
    """Forget ``key`` (missing keys are fine), or everything when ``key`` is None."""
    if key is None:
        DEBUG_VARS.clear()
    else:
        DEBUG_VARS.pop(key, None)


def _list_at(key: str) -> list[Any]:
    current = DEBUG_VARS.setdefault(key, [])
    if not isinstance(current, list):
        raise TypeError(
            f"debug.append/extend need a list under key {key!r}, but it holds a {type(current).__name__}"
        )
    return current


def append(key: str, value: Any) -> None:
    """Append ``value`` to the list under ``key`` (created if missing)."""
    _list_at(key).append(value)


def extend(key: str, value: Iterable[Any]) -> None:
    """Extend the list under ``key`` (created if missing) with the items of ``value``."""
    _list_at(key).extend(value)
