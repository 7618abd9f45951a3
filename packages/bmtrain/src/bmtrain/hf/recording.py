"""transformers 5 records ``output_hidden_states`` / ``output_attentions`` with forward hooks that
it installs on the modules of given classes (``LlamaDecoderLayer``, ``LlamaAttention``), looked
up in a registry keyed by the model's class name. A wrapped model has a new class
(``DistributedLlamaModel``) and its decoder layers sit inside Blocks, so neither is found: this
module registers the wrapped classes and adds, for each recorded class that a Block wraps, a
recorder that matches those Blocks (the hook then sees the Block's own, differentiable output).
"""

from __future__ import annotations

import sys
from typing import Any, cast

import bmt_comm
import torch
from bmt_ckpt import Block

__all__ = ["adapt_output_recording"]

class _BlockClasses(dict[type, type]):
    """``BlockOf<Layer>`` by layer class, one per process (a ``bmt_comm.process_state`` slot)."""


class _BlockOfMeta(type):
    """``isinstance(x, BlockOf[C])``: ``x`` is a Block whose inner module is a ``C``."""

    inner: type

    def __instancecheck__(cls, obj: object) -> bool:
        return isinstance(obj, Block) and isinstance(obj._module, cls.inner)


def _block_of(inner: type) -> type:
    classes = bmt_comm.process_state().slot(_BlockClasses)
    made = classes.get(inner)
    if made is None:
        made = _BlockOfMeta(f"BlockOf{inner.__name__}", (), {"inner": inner})
        classes[inner] = made
    return made


def _adapted(flags: dict[str, Any], recorder: type, wrapped: set[type]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, specs in flags.items():
        listed = list(specs) if isinstance(specs, list) else [specs]
        extra = []
        for spec in listed:
            if isinstance(spec, recorder):
                spec = cast(Any, spec)
                target, index, initial = spec.target_class, spec.index, spec.capture_initial_hidden_state
                layer_name, hidden_key = spec.layer_name, spec.num_hidden_layers_key
            elif isinstance(spec, type):
                target, index, initial, layer_name, hidden_key = spec, (0 if "hidden_states" in key else 1), True, None, None
            else:
                continue  # a class name: matched by module path, which a Block keeps
            if target is None or not any(issubclass(w, target) for w in wrapped):
                continue
            kwargs: dict[str, Any] = dict(target_class=_block_of(target), index=index, layer_name=layer_name,
                                          capture_initial_hidden_state=initial)
            if hidden_key is not None:
                kwargs["num_hidden_layers_key"] = hidden_key
            extra.append(recorder(**kwargs))
        out[key] = listed + extra if extra else specs
    return out


def adapt_output_recording(model: torch.nn.Module) -> None:
    """Re-register the output recording of every transformers model inside ``model`` (a no-op
    when transformers was never imported or is a version without this machinery)."""
    if "transformers" not in sys.modules:
        return
    try:
        from transformers.modeling_utils import PreTrainedModel
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY, OutputRecorder
    except ImportError:
        return
    wrapped = {type(m._module) for m in model.modules() if isinstance(m, Block)}
    for module in model.modules():
        if not isinstance(module, PreTrainedModel):
            continue
        flags = getattr(module, "_can_record_outputs", None) or {}
        _CAN_RECORD_REGISTRY[module] = _adapted(dict(flags), OutputRecorder, wrapped) if flags else flags
