"""A Block's state dict and parameter initialisation, keyed as the inner module's own.

Parameters are saved as full tensors (gathered one at a time, on rank 0 only inside
``bmt_zero.gather.gather_to``) and loaded as full tensors of which each rank keeps its piece of the
flat storage. Unlike the reference, the inner modules' persistent buffers and extra state are
saved and loaded too, so a strict load of a Block's own state dict succeeds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import bmt_comm
import torch
from bmt_zero import (
    DistributedParameter,
    gather_for_state,
    init_distributed_parameter,
    keeps_state,
    load_distributed_param,
    load_plain_tensor,
)

__all__ = ["save_block_state", "load_block_state", "init_block_parameters"]

_EXTRA_STATE = "_extra_state"


def _modules(inner: torch.nn.Module, prefix: str) -> Iterator[tuple[str, torch.nn.Module]]:
    """Every module with its key prefix, shared ones under each name (as ``state_dict`` does)."""
    for name, module in inner.named_modules(remove_duplicate=False):
        yield prefix + (name + "." if name else ""), module


def _has_extra_state(module: torch.nn.Module) -> bool:
    return type(module).get_extra_state is not torch.nn.Module.get_extra_state


FullOf = Callable[[DistributedParameter], "torch.Tensor | None"]


def save_block_state(
    inner: torch.nn.Module, destination: dict[str, Any], prefix: str, keep_vars: bool, full_of: FullOf | None = None
) -> None:
    """``full_of(param)`` gives a parameter's full tensor, a new one (None where not kept); by
    default ``gather_for_state``, one collective per parameter."""
    to_cpu = bmt_comm.get_context().settings.save_param_to_cpu
    keep = keeps_state()  # False on ranks that only help rank 0 gather (bmt.save)
    full_of = full_of or gather_for_state
    for mod_prefix, module in _modules(inner, prefix):
        for name, param in module._parameters.items():
            if isinstance(param, DistributedParameter):
                full = full_of(param)
                if full is not None:
                    destination[mod_prefix + name] = full.cpu() if to_cpu else full
        if not keep:
            continue
        for name, buf in module._buffers.items():
            if buf is not None and name not in module._non_persistent_buffers_set:
                destination[mod_prefix + name] = buf if keep_vars else buf.detach()
        if _has_extra_state(module):
            destination[mod_prefix + _EXTRA_STATE] = module.get_extra_state()


def load_block_state(
    inner: torch.nn.Module,
    state_dict: Mapping[str, Any],
    prefix: str,
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    expected: set[str] = set()
    for mod_prefix, module in _modules(inner, prefix):
        local: dict[str, torch.Tensor] = {k: v for k, v in module._parameters.items() if v is not None}
        local.update(
            (k, v) for k, v in module._buffers.items() if v is not None and k not in module._non_persistent_buffers_set
        )
        for name, tensor in local.items():
            key = mod_prefix + name
            expected.add(key)
            if key not in state_dict:
                missing_keys.append(key)
            elif isinstance(tensor, DistributedParameter):
                load_distributed_param(state_dict, key, tensor, error_msgs)
            else:
                load_plain_tensor(state_dict, key, tensor, error_msgs)
        if type(module).set_extra_state is not torch.nn.Module.set_extra_state:
            key = mod_prefix + _EXTRA_STATE
            expected.add(key)
            if key in state_dict:
                module.set_extra_state(state_dict[key])
            else:
                missing_keys.append(key)
    if strict:
        unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k not in expected)


def init_block_parameters(inner: torch.nn.Module) -> None:
    """``init_method`` of each parameter (in ``named_parameters`` order) on its full tensor."""
    for _, param in inner.named_parameters():
        if isinstance(param, DistributedParameter):
            init_distributed_parameter(param)
