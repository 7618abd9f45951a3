"""Two small protocols between the code that produces sharded gradients or reads parameters
(bmt-zero's flat buffers and checkpoints) and an optimizer that works beside the training loop
(bmt-optim's offload Adam), so that neither package imports the other.

- **Gradient ready.** A flat buffer calls :func:`notify_grad_ready` once its shard's ``.grad``
  holds the sum of the backward pass that just ran through it. A hook may start reading the
  gradient on a stream of its own; it returns, through :meth:`GradReady.add_reader`, an event
  after its reads, and the producer orders its next write of that gradient (the next micro-batch's
  accumulation, a zeroing, a free) after the event.
- **Pending parameter writes.** An optimizer whose update lands later (a delayed update running
  in the background) registers its ``finish`` with :func:`register_pending_writes`; code that
  reads or overwrites parameter values as a whole (checkpoint save and load, state dicts) calls
  :func:`flush_pending_writes` first.
- **Parameter waits.** An optimizer whose update of some parameters may still be in flight when
  the next forward starts (``AdamOffloadOptimizer(overlap_forward=True)``) registers a wait with
  :func:`register_param_wait`; a flat buffer calls :func:`wait_param_writes` with its tensors
  before it reads them (a Block's gather), and the wait lands their writes and orders the current
  stream after them.

Hooks are kept in registration order and removed through the returned handle (or when the
object behind a weakly held bound method is collected).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "GradReady",
    "HookHandle",
    "flush_pending_writes",
    "has_grad_ready_hooks",
    "has_param_waits",
    "notify_grad_ready",
    "register_grad_ready_hook",
    "register_param_wait",
    "register_pending_writes",
    "wait_param_writes",
]


@dataclass
class GradReady:
    """A gradient that is final for the backward pass that just ran."""

    tensors: Sequence[torch.Tensor]  # the flat shard parameter and the parameters viewing it; each ``.grad`` is ready
    stream: torch.cuda.Stream | None  # the stream that wrote it (None on CPU): reads must be ordered after it
    readers: list[torch.cuda.Event] = field(default_factory=list)  # filled by hooks through add_reader

    def add_reader(self, event: torch.cuda.Event) -> None:
        """``event`` is recorded after this hook's reads: the next write of the gradient waits for it."""
        self.readers.append(event)


class HookHandle:
    """Removes one registered hook."""

    def __init__(self, table: dict[int, Callable[..., Any]], key: int) -> None:
        self._table = table
        self._key = key

    def remove(self) -> None:
        self._table.pop(self._key, None)


_grad_hooks: dict[int, Callable[[GradReady], None]] = {}
_flushes: dict[int, Callable[[], None]] = {}
_param_waits: dict[int, Callable[[Sequence[torch.Tensor]], None]] = {}
_next_key = 0


def _add(table: dict[int, Callable[..., Any]], fn: Callable[..., Any]) -> HookHandle:
    global _next_key
    _next_key += 1
    key = _next_key
    if hasattr(fn, "__self__") and hasattr(fn, "__func__"):
        # a bound method is held weakly: a registry must not keep an optimizer alive
        ref = weakref.WeakMethod(fn)

        def call(*args: Any) -> Any:
            method = ref()
            if method is None:
                table.pop(key, None)
                return None
            return method(*args)

        table[key] = call
    else:
        table[key] = fn
    return HookHandle(table, key)


def register_grad_ready_hook(fn: Callable[[GradReady], None]) -> HookHandle:
    """Call ``fn`` each time a flat buffer's gradient is final for a backward pass."""
    return _add(_grad_hooks, fn)


def has_grad_ready_hooks() -> bool:
    return bool(_grad_hooks)


def notify_grad_ready(tensors: Sequence[torch.Tensor], stream: torch.cuda.Stream | None) -> list[torch.cuda.Event]:
    """Run the gradient-ready hooks; returns the events that the next write must wait for."""
    if not _grad_hooks:
        return []
    info = GradReady(tensors, stream)
    for hook in list(_grad_hooks.values()):
        hook(info)
    return info.readers


def register_pending_writes(finish: Callable[[], None]) -> HookHandle:
    """``finish()`` lands parameter writes still in flight (it must return at once when none are)."""
    return _add(_flushes, finish)


def flush_pending_writes() -> None:
    """Land every registered pending parameter write (before parameters are read or overwritten)."""
    for finish in list(_flushes.values()):
        finish()


def register_param_wait(wait: Callable[[Sequence[torch.Tensor]], None]) -> HookHandle:
    """``wait(tensors)`` lands the writes still in flight to any of ``tensors`` and makes the current
    stream wait for them (it must return at once for tensors it does not write)."""
    return _add(_param_waits, wait)


def has_param_waits() -> bool:
    return bool(_param_waits)


def wait_param_writes(tensors: Sequence[torch.Tensor]) -> None:
    """Before ``tensors``' values are read on the current stream: land the writes still in flight."""
    if not _param_waits:
        return
    for wait in list(_param_waits.values()):
        wait(tensors)
