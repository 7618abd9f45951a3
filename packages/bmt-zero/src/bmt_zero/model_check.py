"""Before a model's first forward (and before each load or save of it), the ranks that hold it
check that they built the same model: parameter names, shapes and dtypes, Blocks included.

Each Block already checks its own storage while it is built, so a rank with an extra Block is
still building it when the others reach this check: the two checks meet and every rank raises
the same error saying which rank builds what (``check_agreement``'s out-of-step message), where
the next collective would otherwise fail inside the transport (a gloo size error, an NCCL hang).
One all-gather of 8 bytes when the ranks agree.
"""

from __future__ import annotations

import bmt_comm
import torch

from .agreement import check_agreement
from .parameter import DistributedParameter

__all__ = ["check_model_alike", "describe_model"]


def describe_model(model: torch.nn.Module) -> list[str]:
    """One line per parameter, in registration order: name, full shape, dtype, sharded or not. A
    module whose children live on some ranks only (``_bmt_children_everywhere``, a pipeline) is
    described by its list of children, the same on every rank, not by what this rank holds."""
    lines: list[str] = []
    seen: set[int] = set()

    def visit(module: torch.nn.Module, prefix: str) -> None:
        for name, param in module._parameters.items():
            if param is None or id(param) in seen:
                continue
            seen.add(id(param))
            if isinstance(param, DistributedParameter):
                lines.append(f"{prefix}{name}: {tuple(param._original_shape)} {param.dtype} sharded")
            else:
                lines.append(f"{prefix}{name}: {tuple(param.shape)} {param.dtype} replicated")
        spread = getattr(module, "_bmt_children_everywhere", None)
        if callable(spread):
            lines.append(f"{prefix}*: children spread over ranks {list(spread())}")
            return
        for name, child in module._modules.items():
            if child is not None:
                visit(child, f"{prefix}{name}.")

    visit(model, "")
    return lines


def check_model_alike(model: torch.nn.Module, when: str) -> None:
    """Collective over the ranks of this pipeline stage: raise the same ValueError on every rank
    unless all built ``model`` alike. ``when`` says at which call (e.g. "the first forward")."""
    if not bmt_comm.is_initialized():
        return
    comm = bmt_comm.get_context().comms.pp_zero  # the stage's ranks (everyone without a pipeline)
    what = f"the model ({type(model).__name__}) at {when}"
    check_agreement(describe_model(model), comm, what)
