"""Turn a plain torch model into a distributed one, in place (``BMTrainModelWrapper``'s parameter
conversion; bmt-ckpt adds Blocks for ModuleList children on top)."""

from __future__ import annotations

import bmt_comm
import torch

from .module import DistributedModule, is_block
from .parameter import DistributedParameter

__all__ = ["make_distributed", "convert_module", "distributed_class"]



class _Classes(dict[type[torch.nn.Module], type[torch.nn.Module]]):
    """``Distributed<Name>`` by user class, one per process (a ``process_state`` slot)."""


def distributed_class(cls: type[torch.nn.Module]) -> type[torch.nn.Module]:
    """``Distributed<Name>``: ``cls`` with DistributedModule mixed in (one class per ``cls``).

    ``cls`` comes first in the MRO, so its own overrides (e.g. BatchNorm's state-dict rules) still
    run and reach DistributedModule's through ``super()``.
    """
    if issubclass(cls, DistributedModule):
        return cls
    if cls is torch.nn.Module:  # a bare container: (Module, DistributedModule) has no consistent MRO
        return DistributedModule
    classes = bmt_comm.process_state().slot(_Classes)
    made = classes.get(cls)
    if made is None:
        made = type("Distributed" + cls.__name__, (cls, DistributedModule), {"__module__": cls.__module__})
        classes[cls] = made
    return made


def convert_module(module: torch.nn.Module, memo: dict[int, DistributedParameter] | None = None) -> None:
    """Convert ``module`` itself, not its children: direct parameters become DistributedParameters
    (same ``requires_grad``, values from this rank's tensor), buffers move to the context device,
    the class becomes ``distributed_class(type(module))``. ``memo`` keeps tied parameters tied."""
    ctx = bmt_comm.get_context()
    memo = {} if memo is None else memo
    for name, param in list(module._parameters.items()):
        if param is None or isinstance(param, DistributedParameter):
            continue
        converted = memo.get(id(param))
        if converted is None:
            converted = DistributedParameter(param.detach(), requires_grad=param.requires_grad)
            memo[id(param)] = converted
        module._parameters[name] = converted
    for name, buf in list(module._buffers.items()):
        if buf is not None:
            module._buffers[name] = buf.to(ctx.device)
    module.__class__ = distributed_class(type(module))


def make_distributed(model: torch.nn.Module) -> torch.nn.Module:
    """Convert ``model`` and all its submodules in place and return it.

    DistributedModules and Blocks (which hold their parameters already) are left as they are.
    """
    memo: dict[int, DistributedParameter] = {}
    seen: set[int] = set()

    def visit(module: torch.nn.Module) -> None:
        if id(module) in seen or isinstance(module, DistributedModule) or is_block(module):
            return
        seen.add(id(module))
        convert_module(module, memo)
        for child in module._modules.values():
            if child is not None:
                visit(child)

    visit(model)
    return model
