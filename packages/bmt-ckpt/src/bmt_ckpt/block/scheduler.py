"""The Block scheduler: what Blocks share across one another's runs, one object per bmt context.

``BlockScheduler.current()`` is ``bmt_comm.get_context().slot(BlockScheduler)``: made on first
use after ``init_distributed``, gone with ``destroy``. Each :class:`~.runtime.BlockRuntime` keeps
the one of the context its Block was built under. It holds three things:

- the one prefetched gather: a gather queued for a Block is valid only for the very next Block
  that runs; if another one runs instead, the prefetch is dropped (its memory freed), so an
  unused or stale prefetch (e.g. across an optimizer step) is never consumed;
- the last Block's reduce-scatters, still running on the load stream while the next Block's
  backward computes; when a Block queues its own, the compute stream waits for the previous
  ones and their full gradient buffers are freed: at most two such buffers exist at a time,
  however far the CPU runs ahead of the GPU;
- whether the end-of-backward callback is registered with the running backward pass: once per
  pass it orders the compute stream after the last reduce-scatters (issued on the load stream,
  so they overlap earlier Blocks' backward) and drops an unused prefetch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import bmt_comm
import torch
from bmt_zero import BufferState, ReduceHandle

if TYPE_CHECKING:
    from .runtime import SharedStorage

__all__ = ["BlockScheduler"]


@dataclass(eq=False)
class BlockScheduler:
    """Prefetch, in-flight reduce-scatter and final-callback state of one bmt context."""

    prefetched: SharedStorage | None = None  # the one gather queued ahead of its use
    reducing: list[ReduceHandle] = field(default_factory=list)  # the last Block's reduce-scatters
    final_queued: bool = False  # a final callback is registered with the running backward pass

    @classmethod
    def current(cls) -> BlockScheduler:
        """The scheduler of the current bmt context."""
        return bmt_comm.get_context().slot(cls)

    # --- prefetch ------------------------------------------------------------------------
    def claim(self, shared: SharedStorage | None) -> bool:
        """True if ``shared`` is the prefetched storage; any other prefetch is dropped."""
        target, self.prefetched = self.prefetched, None
        if target is shared:
            return shared is not None
        if target is not None:
            target.release_if_idle()
        return False

    def prefetch(self, shared: SharedStorage) -> None:
        """Start ``shared``'s gather now (if released) for the Block that runs next."""
        self.claim(None)
        if shared.storage.state is BufferState.RELEASED:
            shared.storage.gather_async()
            self.prefetched = shared

    # --- reduce-scatters -----------------------------------------------------------------
    def track_reduce(self, handles: list[ReduceHandle]) -> None:
        """``handles`` are the newest Block's reduce-scatters: wait for the previous ones."""
        self.drain_reduce()
        self.reducing = handles

    def drain_reduce(self) -> None:
        for handle in self.reducing:
            handle.wait()
        self.reducing = []

    # --- end of the backward pass --------------------------------------------------------
    def forward_started(self) -> None:
        """A forward runs outside any backward pass: the next backward needs its own callback."""
        self.final_queued = False

    def queue_final_callback(self, device: torch.device) -> None:
        """Register the end-of-backward callback with the running backward pass (once per pass)."""
        if self.final_queued:
            return
        self.final_queued = True
        engine: Any = torch.autograd.Variable._execution_engine  # type: ignore[attr-defined]
        engine.queue_callback(self._final_callback(device))

    def _final_callback(self, device: torch.device) -> Callable[[], None]:
        def run() -> None:
            self.final_queued = False
            self.claim(None)
            self.drain_reduce()
            streams = bmt_comm.get_context().streams
            bmt_comm.wait_stream(bmt_comm.current_stream(device), streams.load)
            bmt_comm.wait_stream(streams.calc, streams.load)

        return run
