"""Checks of gradients taken as each Block's gradient becomes final during the backward pass.

``OptimManager.update_during_backward()`` with a guard, a loss scale or clipping: an update
may start only once no gradient on any rank holds an inf or a nan, and once the clipping norm
is known; both need every gradient. So while the backward runs, each Block's gradients are read
once, on the side stream that copies them to the host, for an inf/nan flag and the two parts of
their squared 2-norm (shards, replicated parameters; see ``grad_clip``). At the step, only the
gradients no record describes (parameters outside Blocks, gradients changed since) are read
again, then one all-reduce decides for every rank.

A record is valid while the host copy taken with it is current (``GradStream.is_current``): a
gradient changed in place after its Block's backward is read again at the step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from .grad_clip import grad_norm_parts
from .nan_check import check_inf_nan_many_, new_flag

__all__ = ["BackwardChecks", "CheckRecord"]


@dataclass
class CheckRecord:
    """The checks of the gradients of one gradient-ready hook (one Block, one device)."""

    params: list[torch.Tensor]
    flag: torch.Tensor  # int32 (1,): 1 if any of these gradients held an inf or a nan
    sharded: torch.Tensor  # fp32 scalar: sum of squares over the shards among them
    replicated: torch.Tensor  # fp32 scalar: sum of squares over the replicated ones
    event: torch.cuda.Event | None  # after the kernels that wrote the three (None on CPU)

    def ready(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The three on ``device``, ordered after their kernels on the current stream."""
        if self.event is not None:
            stream = torch.cuda.current_stream(self.flag.device)
            stream.wait_event(self.event)
            for t in (self.flag, self.sharded, self.replicated):
                t.record_stream(stream)  # written on the copy stream, read on this one
        return self.flag.to(device), self.sharded.to(device), self.replicated.to(device)


class BackwardChecks:
    """The records of one backward, in the order the gradients arrived."""

    def __init__(self, is_current: Callable[[torch.Tensor], bool]) -> None:
        self._is_current = is_current
        self.records: list[CheckRecord] = []

    def measure(self, params: list[torch.Tensor]) -> None:
        """Check the gradients of ``params`` (all on one device) on the current stream."""
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        device = grads[0].device
        flag = check_inf_nan_many_(grads, new_flag(device))
        sharded, replicated = grad_norm_parts(params, 2.0, device)
        event = None
        if device.type == "cuda":
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record()
        self.records.append(CheckRecord(list(params), flag, sharded, replicated, event))

    def split(self, params: Iterable[torch.Tensor]) -> tuple[list[CheckRecord], list[torch.Tensor]]:
        """(the valid records of ``params``, the parameters of ``params`` no valid record covers).

        A record counts only whole: all its parameters are among ``params`` and current."""
        wanted = {id(p): p for p in params}
        used: list[CheckRecord] = []
        covered: set[int] = set()
        for record in self.records:
            ids = [id(p) for p in record.params]
            if all(i in wanted and i not in covered for i in ids) and all(self._is_current(p) for p in record.params):
                used.append(record)
                covered.update(ids)
        return used, [p for i, p in wanted.items() if i not in covered]
