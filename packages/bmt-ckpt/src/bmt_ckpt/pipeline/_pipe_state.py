"""State dicts of a pipeline: each stage holds its own layers; checkpoints need all of them.

A stage gathers its layers' full tensors (ZeRO over the stage), then the stages exchange them
over the pipe group: to every rank, or inside ``bmt_zero.gather.gather_to(dst)`` to ``dst`` only
(each stage gathers to its rank in ``dst``'s pipe group, which sends to ``dst``).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import bmt_comm
import torch
from bmt_zero import gather_to, state_dst

from ._pipe_ops import PipeLink

__all__ = [
    "layer_keys",
    "layer_index",
    "order_reported",
    "collect_layer_states",
    "exchange_over_pipe",
    "new_state_dict",
    "order_layer_keys",
]

_EXTRA_STATE = "_extra_state"


def layer_keys(inner: torch.nn.Module) -> list[str]:
    """The keys a Block around ``inner`` loads, in the order it reports missing ones
    (``state.load_block_state``): per module, parameters, persistent buffers, extra state."""
    keys: list[str] = []
    for name, module in inner.named_modules(remove_duplicate=False):
        prefix = name + "." if name else ""
        keys.extend(prefix + k for k, v in module._parameters.items() if v is not None)
        keys.extend(
            prefix + k for k, v in module._buffers.items()
            if v is not None and k not in module._non_persistent_buffers_set
        )
        if type(module).set_extra_state is not torch.nn.Module.set_extra_state:
            keys.append(prefix + _EXTRA_STATE)
    return keys


def new_state_dict() -> Any:
    out: Any = OrderedDict()
    out._metadata = OrderedDict()
    return out


def _layer_of(key: str, prefix: str) -> int:
    head = key[len(prefix) :].split(".", 1)[0]
    return int(head) if key.startswith(prefix) and head.isdigit() else -1


def order_layer_keys(module: torch.nn.Module, destination: dict[str, Any], prefix: str, _meta: Any) -> None:
    """State-dict hook: this module's keys in layer order (other keys keep their place first)."""
    mine = sorted((k for k in destination if _layer_of(k, prefix) >= 0), key=lambda k: _layer_of(k, prefix))
    moved = [(k, destination.pop(k)) for k in mine]
    destination.update(moved)


def layer_index(key: str, prefix: str, num_layers: int) -> int:
    """``i`` when ``key`` is ``"<prefix><i>.<name>"`` for a layer ``0 <= i < num_layers``, else -1."""
    if not key.startswith(prefix):
        return -1
    head, dot, rest = key[len(prefix) :].partition(".")
    if not dot or not rest or not head.isdigit() or str(int(head)) != head or int(head) >= num_layers:
        return -1
    return int(head)


def order_reported(keys: list[str], start: int, prefix: str, num_layers: int) -> None:
    """In place: ``keys[start:]`` (a pipeline's missing or unexpected keys) in layer order, keys
    that name no layer first, as torch reports them for a plain list of the layers. Each rank
    reports its own layers (from their Blocks) and the others' (from the pipeline) in another
    order; after this every rank's report is the same."""
    keys[start:] = sorted(keys[start:], key=lambda k: layer_index(k, prefix, num_layers))  # stable


def collect_layer_states(
    blocks: dict[int, torch.nn.Module], stage_id: int, prefix: str, keep_vars: bool
) -> dict[str, Any]:
    """Every layer's state (``"<prefix><layer>.<name>"``) on the ranks that keep state, in layer order.

    Collective over the world; ``blocks`` are this stage's layers by index.
    """
    dst = state_dst()
    topo = bmt_comm.get_context().topology
    keeper = None if dst is None else stage_id * topo.stage_size + dst % topo.stage_size
    own: dict[str, Any] = {}
    with gather_to(keeper):
        for idx in sorted(blocks):
            blocks[idx].state_dict(destination=own, prefix=f"{prefix}{idx}.", keep_vars=keep_vars)
    if dst is not None and dst % topo.stage_size != topo.pipe_idx:
        return {}  # not in dst's pipe group: nothing kept here
    everything = exchange_over_pipe(own, None if dst is None else dst // topo.stage_size)
    return dict(sorted(everything.items(), key=lambda kv: _layer_of(kv[0], prefix)))  # stable within a layer


def exchange_over_pipe(own: dict[str, Any], dst_stage: int | None) -> dict[str, Any]:
    """Every stage's entries: on every pipe rank (``dst_stage`` None), or on ``dst_stage`` only
    (the others return nothing). Tensors travel on the pipe communicator; their metadata and any
    non-tensor value (extra state) as objects."""
    link = PipeLink.current()
    if link.stages == 1:
        return dict(own)
    metas = bmt_comm.allgather_objects(
        [
            (k, tuple(v.shape), v.dtype, v.device.type) if isinstance(v, torch.Tensor) else (k, None, v, None)
            for k, v in own.items()
        ],
        link.comm,
    )
    result: dict[str, Any] = {}
    for stage, meta in enumerate(metas):
        mine = stage == link.stage
        for key, shape, dtype_or_value, where in meta:
            if shape is None:
                result[key] = dtype_or_value
            elif mine and (dst_stage is None or dst_stage == stage):
                result[key] = own[key]
                if dst_stage is None:  # the root of a broadcast to the other stages
                    with link.on_stream():
                        link.comm.broadcast(own[key].to(link.device).contiguous(), stage)
            elif mine:
                assert dst_stage is not None
                link.exchange([(own[key].to(link.device).contiguous(), dst_stage)], [])
            elif dst_stage is None or dst_stage == link.stage:
                buf = torch.empty(shape, dtype=dtype_or_value, device=link.device)
                if dst_stage is None:
                    with link.on_stream():
                        link.comm.broadcast(buf, stage)
                else:
                    link.exchange([], [(buf, stage)])
                result[key] = buf.cpu() if where == "cpu" else buf
    return result if dst_stage is None or dst_stage == link.stage else {}
