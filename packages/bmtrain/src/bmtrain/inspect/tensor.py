"""Record hidden states during forward (and their gradients during backward), then summarise them.

Checkpointed blocks run their forward twice: once without saving activations and again during
backward. A record made during that recomputation is recognised (the autograd engine is
running a backward pass), and is not counted again: it only hands the recomputed tensor's
gradient to the record made by the first forward. So a checkpointed model reports the same
entries, values and gradients as the same model without checkpointing.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import bmt_comm
import torch

from ._stats import ROW, gather_rows, local_row, pool_rows, to_moments

__all__ = ["InspectTensor", "InspectTensorManager", "inspect_tensor", "record_tensor"]


@dataclass(eq=False)
class _Record:
    name: str
    group: str | None
    tensor: torch.Tensor  # the forward value, kept as recorded (this rank's piece)
    # no gradient can reach the forward value (it was made under no_grad, as a checkpointed
    # forward is, or does not require grad): a recomputation in backward may supply one that does
    awaiting_recompute: bool
    grad: torch.Tensor | None = None  # summed over every backward pass inside the context
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def attach(self, x: torch.Tensor) -> None:
        """Collect ``x``'s gradient into this record when backward reaches it."""
        if not x.requires_grad:
            return
        if x.grad_fn is not None:
            x.retain_grad()
        x.register_hook(self._on_grad)  # type: ignore[no-untyped-call]

    def _on_grad(self, grad: torch.Tensor) -> None:
        with self._lock:  # CUDA backward runs on the engine's device threads
            g = grad.detach()
            self.grad = g.clone() if self.grad is None else self.grad + g


def _in_backward() -> bool:
    """True while the autograd engine runs a backward pass (e.g. recomputing a checkpoint)."""
    return bool(torch._C._current_graph_task_id() != -1)


class InspectTensor:
    """The records of one ``inspect_tensor()`` context, in forward order."""

    def __init__(self) -> None:
        self._records: list[_Record] = []
        self._lock = threading.Lock()

    # --- recording ---------------------------------------------------------------------
    def _record(self, x: torch.Tensor, name: str, group: str | None) -> None:
        with self._lock:
            if _in_backward():
                rec = self._match_recomputed(x, name, group)
                if rec is not None:
                    rec.awaiting_recompute = False
                    rec.attach(x)
                return
            # under no_grad (a checkpointed forward) no graph reaches x, even when x is a leaf
            # that requires grad: its gradient can only come through the recomputation
            awaiting = not (torch.is_grad_enabled() and x.requires_grad)
            rec = _Record(name, group, x, awaiting_recompute=awaiting)
            self._records.append(rec)
        if not awaiting:
            rec.attach(x)

    def _match_recomputed(self, x: torch.Tensor, name: str, group: str | None) -> _Record | None:
        """The forward record that a recomputed ``x`` repeats, or None if none awaits it.

        Blocks recompute last-first, so the latest waiting record of that name is the one; when
        a block records the same name twice, equal values pick the right occurrence.
        """
        candidates = [
            r for r in self._records
            if r.awaiting_recompute and r.name == name and r.group == group
            and r.tensor.shape == x.shape and r.tensor.dtype == x.dtype
        ]
        if not candidates:
            return None
        for rec in reversed(candidates):
            if rec.tensor.device == x.device and torch.equal(rec.tensor, x.detach()):
                return rec
        return candidates[-1]

    # --- results -----------------------------------------------------------------------
    def _names(self) -> list[str]:
        seen: dict[tuple[str | None, str], int] = {}
        names = []
        for rec in self._records:
            k = seen.get((rec.group, rec.name), 0)
            seen[(rec.group, rec.name)] = k + 1
            prefix = "" if rec.group is None else f"{rec.group}."
            names.append(f"{prefix}{k}.{rec.name}")
        return names

    def get_summary(self) -> list[dict[str, Any]]:
        """Statistics of every record over all ranks (collective over the world communicator).

        Keys: ``name`` (``"[group.]<k>.<name>"``, ``k`` counting that name's occurrences),
        ``shape`` (dim 0 summed over ranks), ``min``, ``max``, ``mean``, ``std`` (of all ranks'
        values together, in fp32), ``grad_mean``, ``grad_std`` (``None`` without a gradient).
        """
        comm = bmt_comm.get_context().comms.world
        names = self._names()
        if comm.size > 1:
            everyone = bmt_comm.allgather_objects(names, comm)
            for r, theirs in enumerate(everyone):
                if theirs != names:
                    raise RuntimeError(
                        "get_summary() needs every rank to record the same tensors in the same "
                        f"order; rank {comm.rank} recorded {names}, rank {r} recorded {theirs} "
                        "(are ranks running different pipeline stages or code paths?)"
                    )
        if not names:
            return []
        rows = torch.stack([self._row(rec) for rec in self._records])  # (E, 2*ROW + 1)
        gathered = gather_rows(rows, comm)  # (W, E, 2*ROW + 1)
        values = pool_rows(gathered[..., :ROW].transpose(0, 1))  # (E, ROW)
        grads = pool_rows(gathered[..., ROW : 2 * ROW].transpose(0, 1))
        rows_total = gathered[..., 2 * ROW].sum(0)  # (E,)
        summary = []
        for i, (name, rec) in enumerate(zip(names, self._records, strict=True)):
            v, g = to_moments(values[i]), to_moments(grads[i])
            shape = (int(rows_total[i]), *rec.tensor.shape[1:])
            summary.append(
                {
                    "name": name,
                    "min": v.min,
                    "max": v.max,
                    "mean": v.mean,
                    "std": v.std,
                    "shape": shape,
                    "grad_mean": g.mean if g.count else None,
                    "grad_std": g.std if g.count else None,
                }
            )
        return summary

    @staticmethod
    def _row(rec: _Record) -> torch.Tensor:
        x = rec.tensor
        lead = float(x.shape[0]) if x.dim() else 1.0  # a 0-dim tensor counts as one row
        lead_t = torch.tensor([lead], dtype=torch.float64)
        return torch.cat([local_row(x).cpu(), local_row(rec.grad).cpu(), lead_t])

    def get_tensor(self, name: str, group: str | None = None, index: int | None = None) -> torch.Tensor | None:
        """This rank's recorded tensor of that name and group (occurrence ``index``, default 0)."""
        matches = [r for r in self._records if r.name == name and r.group == group]
        i = 0 if index is None else index
        if not -len(matches) <= i < len(matches):
            return None
        return matches[i].tensor

    def get_grad(self, name: str, group: str | None = None, index: int | None = None) -> torch.Tensor | None:
        """The gradient reaching that recorded tensor in backward (``None`` if none reached it)."""
        matches = [r for r in self._records if r.name == name and r.group == group]
        i = 0 if index is None else index
        if not -len(matches) <= i < len(matches):
            return None
        return matches[i].grad


@dataclass
class _Active:
    """The open ``inspect_tensor()`` context (a ``bmt_comm.process_state`` slot): process-wide,
    not thread-local, as backward runs on other threads."""

    inspector: InspectTensor | None = None


def _active() -> _Active:
    return bmt_comm.process_state().slot(_Active)


class InspectTensorManager:
    """The context manager ``inspect_tensor()`` returns (1.0.1's class): ``__enter__`` gives a
    fresh :class:`InspectTensor` that collects ``record_tensor`` calls until ``__exit__``."""

    def __init__(self) -> None:
        self._inspector: InspectTensor | None = None

    def __enter__(self) -> InspectTensor:
        active = _active()
        if active.inspector is not None:
            raise RuntimeError("inspect_tensor() contexts cannot be nested: one is already active")
        self._inspector = InspectTensor()
        active.inspector = self._inspector
        return self._inspector

    def __exit__(self, *exc: object) -> None:
        active = _active()
        if active.inspector is self._inspector:
            active.inspector = None
        self._inspector = None


def inspect_tensor() -> InspectTensorManager:
    """Record ``record_tensor`` calls made inside; run forward *and* backward inside it."""
    return InspectTensorManager()


def record_tensor(x: torch.Tensor, name: str, group: str | None = None) -> None:
    """Keep ``x`` (and, after backward, its gradient) under ``name``; a no-op outside the context."""
    if isinstance(x, torch.nn.Parameter):
        raise RuntimeError(
            f"record_tensor cannot record a Parameter (got {name!r}); use inspect_model for parameters"
        )
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"record_tensor expects a tensor for {name!r}, got {type(x).__name__}")
    inspector = _active().inspector
    if inspector is not None:
        inspector._record(x, name, group)
