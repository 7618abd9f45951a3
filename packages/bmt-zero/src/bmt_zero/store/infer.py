"""``_save_to_infer_model``: stream a trained model, layer by layer, into an inference engine."""

from __future__ import annotations

from typing import Any

import bmt_comm
import torch

from ..gather import gather_to
from ..module import is_block
from .gathered import StateDict, _new_state, _save_to_local_rank0

__all__ = ["_save_to_infer_model"]


def _is_block_list(module: torch.nn.Module) -> bool:
    children = [c for c in module._modules.values() if c is not None]
    return bool(children) and all(is_block(c) for c in children)


def _stream(module: torch.nn.Module, infer_model: Any, destination: StateDict, prefix: str, keep: bool) -> StateDict:
    local_metadata: dict[str, Any] = {"version": module._version}
    getattr(destination, "_metadata")[prefix[:-1]] = local_metadata  # noqa: B009
    module._save_to_state_dict(destination if keep else _new_state(), prefix, False)
    for name, child in module._modules.items():
        if child is None:
            continue
        if _is_block_list(child):
            for layer_name, layer in child._modules.items():
                if layer is None:
                    continue
                layer_state = _save_to_local_rank0(layer, None, f"{prefix}{name}.{layer_name}.")
                if keep:
                    infer_model.load_layer_state_dict(layer_state)
        else:
            destination = _stream(child, infer_model, destination, prefix + name + ".", keep)
    for hook in module._state_dict_hooks.values():
        result = hook(module, destination, prefix, local_metadata)
        if result is not None and not getattr(hook, "_from_public_api", False):
            destination = result
    return destination


def _save_to_infer_model(
    model: torch.nn.Module, infer_model: Any, destination: StateDict | None = None, prefix: str = ""
) -> StateDict:
    """Collective: each layer of a block list is gathered and handed, on each node's local rank 0,
    to ``infer_model.load_layer_state_dict(layer_state)``; the remaining tensors are returned
    (there, empty elsewhere). Tensors stay on the device; unlike the reference, the
    ``save_param_to_cpu`` setting is restored afterwards."""
    ctx = bmt_comm.get_context()
    keep = ctx.local_rank == 0
    settings = ctx.settings
    saved = settings.save_param_to_cpu
    settings.save_param_to_cpu = False  # the inference engine lives on the GPU: no round trip through CPU
    try:
        with gather_to(None):
            return _stream(model, infer_model, destination if destination is not None else _new_state(), prefix, keep)
    finally:
        settings.save_param_to_cpu = saved
