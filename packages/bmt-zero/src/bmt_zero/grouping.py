"""``grouped_parameters``: the model's trainable tensors by ``DistributedParameter.group``."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextvars import ContextVar

import torch

from .module import is_block

__all__ = ["grouped_parameters"]

# as in init_params: ids of the modules whose own grouped_parameters() is running (it may call us)
_RUNNING: ContextVar[frozenset[int]] = ContextVar("bmt_zero_grouping_running", default=frozenset())


def _collect_block(module: torch.nn.Module, add: Callable[[str | None, torch.nn.Parameter], None]) -> bool:
    """Add a Block's flat storage parameters; False if it has no ``grouped_parameters()`` to ask."""
    method = getattr(module, "grouped_parameters", None)
    if not callable(method) or id(module) in _RUNNING.get():
        return False
    token = _RUNNING.set(_RUNNING.get() | {id(module)})
    try:
        for group, params in method():
            for p in params:
                add(group, p)
    finally:
        _RUNNING.reset(token)
    return True


def grouped_parameters(model: torch.nn.Module) -> Iterator[tuple[str | None, list[torch.nn.Parameter]]]:
    """``(group, [params])`` pairs in first-seen order; plain parameters are in group ``None``.

    Blocks contribute their flat storage parameters (their ``grouped_parameters()``), never the
    per-parameter views into that storage, so no tensor is listed twice or aliased.
    """
    groups: dict[str | None, list[torch.nn.Parameter]] = {}
    seen_params: set[int] = set()
    seen_modules: set[int] = set()

    def add(group: str | None, param: torch.nn.Parameter) -> None:
        if id(param) not in seen_params:
            seen_params.add(id(param))
            groups.setdefault(group, []).append(param)

    def walk(module: torch.nn.Module) -> None:
        if id(module) in seen_modules:
            return
        seen_modules.add(id(module))
        if is_block(module) and _collect_block(module, add):
            return
        for param in module._parameters.values():
            if param is not None and not getattr(param, "_in_block", False):
                add(getattr(param, "group", None), param)
        for child in module._modules.values():
            if child is not None:
                walk(child)

    walk(model)
    yield from groups.items()
