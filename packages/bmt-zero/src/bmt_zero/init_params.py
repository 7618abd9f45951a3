"""``init_parameters``: run each DistributedParameter's ``init_method`` without ever holding more
than one full parameter at a time."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextvars import ContextVar

import torch

from .gather import tp_chunk
from .module import is_block
from .parameter import DistributedParameter

__all__ = ["init_parameters", "init_distributed_parameter"]

# ids of the modules whose init_parameters() is running (in this thread / task): a module that
# calls bmt.init_parameters(self) from its own init_parameters is walked generically instead of
# calling itself again
_RUNNING: ContextVar[frozenset[int]] = ContextVar("bmt_zero_init_running", default=frozenset())


class _Scratch:
    """One reusable full-size buffer per (dtype, device): a parameter's full tensor is a view of
    it, so building a model costs one allocation (and one round of page faults), not one each."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}

    def full(self, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (dtype, device)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < shape.numel():
            self._buffers.pop(key, None)
            del buf  # free the smaller one before allocating the larger
            buf = torch.empty(shape.numel(), dtype=dtype, device=device)
            self._buffers[key] = buf
        return buf[: shape.numel()].view(shape)


def init_distributed_parameter(param: DistributedParameter, scratch: _Scratch | None = None) -> None:
    """Materialise the full (tp-full in ``tp_mode``) tensor on the parameter's device, run
    ``init_method`` on it, keep this rank's slice. All ranks draw the same values (same seed),
    so the result does not depend on the world size."""
    if param._init_method is None:
        return
    shape = param._tp_original_shape if param._tp_mode else param._original_shape
    with torch.no_grad():
        if scratch is None:
            full = torch.empty(shape, dtype=param.dtype, device=param.device)
        else:
            full = scratch.full(shape, param.dtype, param.device)
        param._init_method(full)
        local = tp_chunk(full, param).reshape(-1)
        param.data.view(-1).copy_(local[param._start_partition : param._end_partition])


def _walk(module: torch.nn.Module, seen: set[int]) -> Iterator[torch.nn.Module]:
    """``module`` and its descendants in ``named_modules`` order, Blocks yielded but not entered."""
    if id(module) in seen:
        return
    seen.add(id(module))
    yield module
    if _runs_own(module):
        return
    for child in module._modules.values():
        if child is not None:
            yield from _walk(child, seen)


def _runs_own(module: torch.nn.Module) -> bool:
    return is_block(module) and id(module) not in _RUNNING.get()


def _run_own(module: torch.nn.Module) -> None:
    token = _RUNNING.set(_RUNNING.get() | {id(module)})
    try:
        method: Callable[[], object] = getattr(module, "init_parameters")  # noqa: B009 - a registered BlockType
        method()
    finally:
        _RUNNING.reset(token)


def init_parameters(model: torch.nn.Module) -> None:
    """Initialise every DistributedParameter that has an ``init_method``; Blocks (modules of a
    registered :class:`~bmt_zero.module.BlockType`) initialise their own. Any other module is
    walked, whatever methods it has (a user's ``init_parameters`` method is not called).
    Parameters without an ``init_method`` keep their values; a parameter shared by several
    modules is initialised once."""
    done: set[int] = set()
    scratch = _Scratch()
    for module in _walk(model, set()):
        if _runs_own(module):
            _run_own(module)
            continue
        for param in module._parameters.values():
            if isinstance(param, DistributedParameter) and not param._in_block and id(param) not in done:
                done.add(id(param))
                init_distributed_parameter(param, scratch)
