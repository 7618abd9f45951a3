"""``DistributedModule``: a module whose DistributedParameters read as full tensors and save as full
tensors, while each rank stores only its shard."""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import bmt_comm
import torch

from .gather import gather_for_state, keeps_state, tp_chunk
from .model_check import check_model_alike
from .parameter import DistributedParameter
from .reads import enter_scope, exit_scope, read_full
from .replicated import sync_replicated_grads

__all__ = [
    "BlockType",
    "DistributedModule",
    "ShardSource",
    "load_distributed_param",
    "load_plain_tensor",
    "is_block",
    "mark_in_block",
]

_EXTRA_STATE_KEY = "_extra_state"


class BlockType(abc.ABC):  # noqa: B024 - a registry for isinstance, nothing to implement
    """The kind of module bmt-zero treats as a Block: it keeps its parameters in its own flat
    storage, initialises them itself (``init_parameters()``) and lists its flat parameters
    (``grouped_parameters()``). bmt-ckpt's Block registers itself (a lower package never imports
    a higher one): ``BlockType.register(cls)``. A module is a Block by registration only, never
    because it has a method of that name (1.0.1 tests ``isinstance(module, Block)``)."""

    __slots__ = ()


def is_block(module: torch.nn.Module) -> bool:
    """Whether ``module`` is a registered Block (see :class:`BlockType`)."""
    return isinstance(module, BlockType)


@runtime_checkable
class ShardSource(Protocol):
    """A state dict that can deliver to each rank only its piece of a tensor (``bmt.load``'s)."""

    def shape_of(self, key: str) -> torch.Size | None:
        """The checkpoint tensor's shape (None for a non-tensor value); no communication."""

    def load_shard(self, key: str, param: DistributedParameter) -> None:
        """Collective: copy this rank's piece of the checkpoint tensor ``key`` into ``param``."""


def _expected_shape(param: DistributedParameter) -> torch.Size:
    return param._tp_original_shape if param._tp_mode else param._original_shape


def _size_mismatch(key: str, got: torch.Size, expected: torch.Size) -> str:
    return (
        f"size mismatch for {key}: copying a param with shape {got} from checkpoint, "
        f"the shape in current model is {expected}."
    )


def load_distributed_param(
    state_dict: Mapping[str, Any], key: str, param: DistributedParameter, error_msgs: list[str]
) -> None:
    """Copy this rank's piece of the full tensor ``state_dict[key]`` into ``param``.

    The tensor has the model's whole logical shape (tp-full in ``tp_mode``: it is split along
    ``tp_split_dim`` first). A shape mismatch is appended to ``error_msgs`` as torch does. Works
    for parameters inside a Block too (their piece is ``[_start_partition, _end_partition)``).
    """
    expected = _expected_shape(param)
    if isinstance(state_dict, ShardSource):
        shape = state_dict.shape_of(key)
        if shape is None:
            error_msgs.append(
                f'While copying the parameter named "{key}", expected torch.Tensor or Tensor-like '
                "object from checkpoint but received a non-tensor value"
            )
        elif shape != expected:
            error_msgs.append(_size_mismatch(key, shape, expected))
        else:
            state_dict.load_shard(key, param)
        return
    value = state_dict[key]
    if not isinstance(value, torch.Tensor):
        error_msgs.append(
            f'While copying the parameter named "{key}", expected torch.Tensor or Tensor-like '
            f"object from checkpoint but received {type(value)}"
        )
        return
    if value.shape != expected:
        error_msgs.append(_size_mismatch(key, value.shape, expected))
        return
    local = tp_chunk(value.detach(), param).reshape(-1)
    with torch.no_grad():
        param.data.view(-1).copy_(local[param._start_partition : param._end_partition])


def load_plain_tensor(
    state_dict: Mapping[str, Any], key: str, tensor: torch.Tensor, error_msgs: list[str]
) -> None:
    """torch's rule for an ordinary parameter or buffer: check, then copy in place."""
    value = state_dict[key]
    if not torch.overrides.is_tensor_like(value):  # type: ignore[no-untyped-call]
        error_msgs.append(
            f'While copying the parameter named "{key}", expected torch.Tensor or Tensor-like '
            f"object from checkpoint but received {type(value)}"
        )
        return
    if tensor.dim() == 0 and value.dim() == 1 and value.shape[0] == 1:
        value = value[0]  # torch's compatibility rule for 1-element checkpoints of scalars
    if value.shape != tensor.shape:
        error_msgs.append(_size_mismatch(key, value.shape, tensor.shape))
        return
    try:
        with torch.no_grad():
            tensor.copy_(value)
    except Exception as ex:
        error_msgs.append(
            f'While copying the parameter named "{key}", whose dimensions in the model are '
            f"{tensor.size()} and whose dimensions in the checkpoint are {value.size()}, "
            f"an exception occurred : {ex.args}."
        )


def mark_in_block(inner: torch.nn.Module) -> None:
    """The DistributedModules under a Block's inner module need no first-call work: the Block
    checked that every rank built it alike, and it holds only DistributedParameters (nothing
    replicated to hook). Marked so, a compiled call of them traces straight through."""
    for module in inner.modules():
        if isinstance(module, DistributedModule):
            module.__dict__["_bmt_called"] = True


class DistributedModule(torch.nn.Module):
    """A module holding DistributedParameters.

    Reading ``self.<param>`` outside a Block gives the gathered, differentiable full tensor (a
    collective: gathered once per outermost module call and reused there, see ``reads``); inside a Block, the parameter itself (full during the Block's
    forward and backward). ``state_dict()`` gives full tensors, keyed as the unsharded module's;
    ``load_state_dict()`` takes full tensors and keeps each rank's shard.
    """

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling() and self.__dict__.get("_bmt_called"):
            # traced by torch.compile (a Block's compiled inner module, see mark_in_block): a
            # ContextVar cannot be traced (each would break the graph), inside a Block nothing
            # is gathered, and the first-call work is done. Otherwise the code below runs
            # (dynamo breaks the graph around it and runs it eagerly).
            return super().__call__(*args, **kwargs)
        token = enter_scope()  # reads in this call (and calls inside it) share one gather each
        try:
            first = not self.__dict__.get("_bmt_called")
            if token is not None or first:
                if first and token is not None:  # the outermost module's first call: its structure is final
                    check_model_alike(self, "its first forward")
                self.__dict__["_bmt_called"] = True
                sync_replicated_grads(self)  # plain parameters' gradients are summed over the zero group
            return super().__call__(*args, **kwargs)
        finally:
            exit_scope(token)

    def __getattr__(self, name: str) -> Any:
        value = super().__getattr__(name)
        if isinstance(value, DistributedParameter) and not value._in_block:
            return read_full(value)
        return value

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        bmt_comm.flush_pending_writes()  # a delayed optimizer update in flight lands first
        to_cpu = bmt_comm.get_context().settings.save_param_to_cpu
        keep = keeps_state()  # False on the ranks that only help rank 0 gather (bmt.save)
        for name, param in self._parameters.items():
            if param is None:
                continue
            if isinstance(param, DistributedParameter):
                full = gather_for_state(param)
                if full is not None:
                    destination[prefix + name] = full.cpu() if to_cpu else full
            elif keep:
                value = param if keep_vars else param.detach()
                destination[prefix + name] = value.cpu() if to_cpu and not keep_vars else value
        if not keep:
            return
        for name, buf in self._buffers.items():
            if buf is not None and name not in self._non_persistent_buffers_set:
                destination[prefix + name] = buf if keep_vars else buf.detach()
        if type(self).get_extra_state is not torch.nn.Module.get_extra_state:
            destination[prefix + _EXTRA_STATE_KEY] = self.get_extra_state()

    def _load_from_state_dict(
        self,
        state_dict: Mapping[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        bmt_comm.flush_pending_writes()  # a delayed update landing later would overwrite what is loaded
        for hook in self._load_state_dict_pre_hooks.values():
            hook(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        local: dict[str, torch.Tensor] = {k: v for k, v in self._parameters.items() if v is not None}
        local.update(
            (k, v) for k, v in self._buffers.items()
            if v is not None and k not in self._non_persistent_buffers_set
        )
        for name, tensor in local.items():
            key = prefix + name
            if key not in state_dict:
                if strict:
                    missing_keys.append(key)
            elif isinstance(tensor, DistributedParameter):
                load_distributed_param(state_dict, key, tensor, error_msgs)
            else:
                load_plain_tensor(state_dict, key, tensor, error_msgs)

        extra_key = prefix + _EXTRA_STATE_KEY
        if type(self).set_extra_state is not torch.nn.Module.set_extra_state:
            if extra_key in state_dict:
                self.set_extra_state(state_dict[extra_key])
            elif strict:
                missing_keys.append(extra_key)
        elif strict and extra_key in state_dict:
            unexpected_keys.append(extra_key)

        if strict:  # torch's rule: a key is unexpected unless it names a local tensor or a child
            for key in state_dict:
                if key.startswith(prefix) and key != extra_key:
                    head = key[len(prefix) :].split(".", 1)
                    if len(head) > 1:
                        if head[0] not in self._modules:
                            unexpected_keys.append(key)
                    elif head[0] not in local:
                        unexpected_keys.append(key)
