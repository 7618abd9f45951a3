"""Gradients that leave the GPU during the backward pass (``AdamOffloadOptimizer(overlap=True)``).

Every parameter of the optimizer gets a full-size host copy of its gradient: views of one
page-locked allocation when CUDA exists (``HostArena``: asynchronous copies, no rounding up). When a flat buffer's gradient is final for a backward
pass (``bmt_comm``'s gradient-ready hook: a Block's backward has summed it), the gradients of
this optimizer's parameters in it are copied device->host on a side stream at once, while the
backward goes on through the earlier Blocks; the producer's next write of that gradient waits
for the copy. A later backward before the step (accumulation) copies them again.

With ``measure`` set (a checked ``update_during_backward``), each hook's gradients are first
handed to it on the same side stream, so the inf/nan check and the norm read each gradient once,
while it is hot, instead of in a pass over all gradients at the step.

At the step, a gradient whose copy is stale is copied then: one changed in place since its copy
(clipping, a user's edit: its version counter moved), replaced, or never copied (parameters
outside Blocks, which no hook reports). Then the update reads host memory only.

With ``sets=2`` (the delayed update) two host copies alternate: the background update of step t
reads one while the backward of step t+1 fills the other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import bmt_comm
import torch

from ._host_arena import HostArena

__all__ = ["GradStream"]

_Mark = tuple[int, int, int, torch.dtype]  # (data_ptr, version, numel, dtype) of the device gradient copied


def _mark(g: torch.Tensor) -> _Mark:
    return (g.data_ptr(), g._version, g.numel(), g.dtype)


@dataclass
class _Copy:
    """One parameter's host gradient, per set."""

    host: list[torch.Tensor | None]  # per set, 1-D in the gradient's dtype: a view of the set's arena, or its own
    mark: _Mark | None = None  # what the current set holds; None: nothing copied since the last step
    event: torch.cuda.Event | None = None  # the device->host copy into the current set has finished


@dataclass
class _Set:
    free: dict[torch.device, torch.cuda.Event] = field(default_factory=dict)  # the last reads of this set's memory (H2D)
    arena: HostArena | None = None  # one allocation for the gradients of every parameter, laid out as _params


class GradStream:
    """Host copies of an optimizer's gradients, filled as Blocks finish their backward."""

    def __init__(self, sets: int = 1) -> None:
        if sets not in (1, 2):
            raise ValueError(f"sets must be 1 or 2, got {sets}")
        self._sets = [_Set() for _ in range(sets)]
        self.current = 0  # the set the next copies fill
        self._params: list[torch.Tensor] = []
        self._index: dict[int, int] = {}  # id(param) -> position in _params
        self._copies: list[_Copy] = []
        self._retired: list[HostArena] = []  # arenas of an older parameter layout
        self._d2h: dict[torch.device, torch.cuda.Stream] = {}  # why: copies overlap the rest of the backward
        # called after a hook's copies are queued, with the parameters' indices and the producing stream
        self.on_copied: Callable[[list[int], torch.cuda.Stream | None], None] | None = None
        # called before copies into a set: an update still reading that set's memory lands first
        self.before_copy: Callable[[], None] | None = None
        # called with the parameters of each gradient-ready hook, on the stream that copies their
        # gradients (before the copies; CPU: inline): checks that read each gradient once, as it arrives
        self.measure: Callable[[list[torch.Tensor]], None] | None = None
        self._hook = bmt_comm.register_grad_ready_hook(self._on_ready)

    def close(self) -> None:
        self._hook.remove()
        for stream in self._d2h.values():
            stream.synchronize()  # no copy may still write memory that is unlocked below
        for st in self._sets:
            for event in st.free.values():
                event.synchronize()
        for c in self._copies:
            c.host = [None] * len(self._sets)
        for arena in [st.arena for st in self._sets] + self._retired:
            if arena is not None:
                arena.close()  # unlocked now; the memory goes with the last view
        for st in self._sets:
            st.arena = None
        self._retired = []

    def track(self, params: list[torch.Tensor]) -> None:
        """The optimizer's parameters now (called at each step: groups may have been added)."""
        if len(params) == len(self._params) and all(a is b for a, b in zip(params, self._params, strict=True)):
            return
        old = {id(p): c for p, c in zip(self._params, self._copies, strict=True)}
        self._params = list(params)
        self._index = {id(p): i for i, p in enumerate(self._params)}
        self._copies = [old.get(id(p)) or _Copy([None] * len(self._sets)) for p in self._params]
        for st in self._sets:  # the layout changed: the old arena is kept (copies may still use it) until close()
            if st.arena is not None:
                self._retired.append(st.arena)
                st.arena = None

    # --- filling -------------------------------------------------------------------------
    def _stream(self, device: torch.device) -> torch.cuda.Stream:
        s = self._d2h.get(device)
        if s is None:
            s = self._d2h[device] = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
        return s

    def _host(self, i: int, g: torch.Tensor) -> torch.Tensor:
        c, st = self._copies[i], self._sets[self.current]
        h = c.host[self.current]
        if h is not None and h.numel() == g.numel() and h.dtype == g.dtype:
            return h
        if st.arena is None:
            pin = any(q.device.type == "cuda" for q in self._params)
            # room for the parameters that train now (a frozen one's gradient never comes)
            st.arena = HostArena([(q.numel() if q.requires_grad else 0, q.dtype) for q in self._params], pin)
        h = st.arena.view(i)
        if h.numel() != g.numel() or h.dtype != g.dtype:
            # a gradient of another dtype than its parameter, or of one unfrozen since: memory of its own
            h = torch.empty(g.numel(), dtype=g.dtype, pin_memory=g.device.type == "cuda")
        c.host[self.current] = h
        return h

    def _copy(
        self, indices: list[int], after: torch.cuda.Stream | None, device: torch.device, measure: bool = False
    ) -> torch.cuda.Event | None:
        """Copy the gradients of ``indices`` (all on ``device``) into the current set (``measure``:
        hand them to ``self.measure`` first, on the same stream)."""
        if self.before_copy is not None:
            self.before_copy()
        measure_fn = self.measure if measure else None
        if device.type != "cuda":
            if measure_fn is not None:
                measure_fn([self._params[i] for i in indices])
            for i in indices:
                g = self._params[i].grad
                assert g is not None
                c = self._copies[i]
                self._host(i, g).copy_(g.reshape(-1))
                c.mark, c.event = _mark(g), None
            return None
        d2h = self._stream(device)
        d2h.wait_stream(after if after is not None else torch.cuda.current_stream(device))
        free = self._sets[self.current].free.get(device)
        if free is not None:
            d2h.wait_event(free)  # the last step's H2D read this set's memory
        with torch.cuda.stream(d2h):
            if measure_fn is not None:
                measure_fn([self._params[i] for i in indices])
            for i in indices:
                g = self._params[i].grad
                assert g is not None
                self._host(i, g).copy_(g.detach().reshape(-1), non_blocking=True)
        event = torch.cuda.Event()  # type: ignore[no-untyped-call]
        event.record(d2h)
        for i in indices:
            g = self._params[i].grad
            assert g is not None
            self._copies[i].mark, self._copies[i].event = _mark(g), event
        return event

    def _on_ready(self, info: bmt_comm.GradReady) -> None:
        by_device: dict[torch.device, list[int]] = {}
        for t in info.tensors:
            i = self._index.get(id(t))
            if i is not None and t.grad is not None and t.requires_grad:
                by_device.setdefault(t.grad.device, []).append(i)
        for device, indices in by_device.items():
            event = self._copy(indices, info.stream, device, measure=True)
            if event is not None:
                info.add_reader(event)
            if self.on_copied is not None:
                self.on_copied(indices, info.stream)

    # --- the step ------------------------------------------------------------------------
    def param(self, index: int) -> torch.Tensor:
        return self._params[index]

    def index(self, p: torch.Tensor) -> int:
        return self._index[id(p)]

    def copied(self, index: int) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        """The host gradient of parameter ``index`` in the current set, and the event of its copy."""
        c = self._copies[index]
        host = c.host[self.current]
        assert host is not None and c.mark is not None, "no copy of this gradient since the last step"
        return host, c.event

    def is_current(self, p: torch.Tensor) -> bool:
        """Whether the copy of ``p``'s gradient is what the gradient holds now."""
        c = self._copies[self._index[id(p)]]
        return p.grad is not None and c.mark == _mark(p.grad)

    def collect(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """The host gradients of ``params`` (each has a ``.grad``), copying the stale ones now and
        waiting for every copy; afterwards nothing is copied until the next backward."""
        stale: dict[torch.device, list[int]] = {}
        for p in params:
            i = self._index[id(p)]
            g = p.grad
            assert g is not None
            c = self._copies[i]
            if c.mark != _mark(g) or c.host[self.current] is None:
                stale.setdefault(g.device, []).append(i)
        for device, indices in stale.items():
            self._copy(indices, None, device)
        out = []
        for p in params:
            c = self._copies[self._index[id(p)]]
            if c.event is not None:
                c.event.synchronize()  # the update reads it on the CPU
            host = c.host[self.current]
            assert host is not None
            out.append(host)
        self.forget()
        return out

    def forget(self) -> None:
        """The gradients were zeroed or dropped: no copy describes them any more."""
        for c in self._copies:
            c.mark, c.event = None, None

    def set_free_event(self, index: int, device: torch.device, event: torch.cuda.Event) -> None:
        """``event`` follows the last read of set ``index``'s memory by copies to ``device``."""
        self._sets[index].free[device] = event

    def flip(self) -> None:
        """The next copies fill the other set (the delayed update reads this one in the background)."""
        self.current = (self.current + 1) % len(self._sets)

    def __del__(self) -> None:
        self.close()
