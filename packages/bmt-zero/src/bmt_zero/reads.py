"""Reads of DistributedParameters outside Blocks: one all-gather per parameter per forward.

BMTrain 1.0.1 all-gathered on every attribute read: a tied embedding read twice in one forward
was gathered twice, and its gradient reduce-scattered twice. Here a read inside a
DistributedModule's call reuses the full tensor that an earlier read in the same outermost call
gathered (in the same grad mode), and autograd sums both uses' gradients into one
reduce-scatter. The reuse ends with the outermost call, so a read after an optimizer step sees
the new values. Like the root of an FSDP2 model, these full tensors live until the outermost
forward returns (autograd keeps what backward needs after that).

``reused_gathers()`` widens the scope by hand, e.g. around a decoding loop under ``no_grad``: one
gather per parameter for the whole loop, on the promise that no parameter changes inside it.
``reused_gathers(False)`` turns reuse off inside (1.0.1's behaviour: each read gathers, and its
full tensor is freed as soon as nothing uses it), for a large untied embedding whose full table
should not stay alive through the forward.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Iterator
from contextvars import ContextVar, Token

import torch

from .parameter import DistributedParameter

__all__ = ["reused_gathers", "read_full", "enter_scope", "exit_scope"]

# (id(param), grad enabled, inference mode) -> (param, its full tensor); None outside any scope,
# OFF inside reused_gathers(False). The param itself is kept in the value so that its id cannot
# be reused while the entry lives.
_Cache = dict[tuple[int, bool, bool], tuple[DistributedParameter, torch.Tensor]]


class _Off(enum.Enum):
    OFF = "off"  # a scope without reuse: nothing is ever stored


_Scope = _Cache | _Off | None
_SCOPE: ContextVar[_Scope] = ContextVar("bmt_zero_reused_gathers", default=None)


def enter_scope() -> Token[_Scope] | None:
    """Open a scope unless one is open (then None: the outer one keeps the gathered tensors)."""
    if _SCOPE.get() is not None:
        return None
    return _SCOPE.set({})


def exit_scope(token: Token[_Scope] | None) -> None:
    if token is not None:
        _SCOPE.reset(token)


@contextlib.contextmanager
def reused_gathers(enabled: bool = True) -> Iterator[None]:
    """Inside, each DistributedParameter read outside a Block is all-gathered once (per grad
    mode) and then reused; the parameters must not change until the block exits. With
    ``enabled=False``, every read inside gathers anew (module calls inside open no scope)."""
    token = _SCOPE.set(_Off.OFF) if not enabled else enter_scope()
    try:
        yield
    finally:
        exit_scope(token)


def read_full(param: DistributedParameter) -> torch.Tensor:
    """The full, differentiable tensor of ``param``: the scope's earlier gather, or a new one."""
    cache = _SCOPE.get()
    if cache is None or cache is _Off.OFF:
        return param.gather()
    key = (id(param), torch.is_grad_enabled(), torch.is_inference_mode_enabled())
    hit = cache.get(key)
    if hit is None:
        hit = cache[key] = (param, param.gather())
    return hit[1]
