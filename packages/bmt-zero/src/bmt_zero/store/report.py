"""The end of a load: torch's report of missing and unexpected keys, and its error message."""

from __future__ import annotations

import torch
from torch.nn.modules.module import _IncompatibleKeys

__all__ = ["finish_load"]


def finish_load(
    model: torch.nn.Module, missing: list[str], unexpected: list[str], errors: list[str], strict: bool
) -> _IncompatibleKeys:
    """Raise as ``torch.nn.Module.load_state_dict`` does (key problems first under ``strict``),
    else return the keys."""
    if strict:
        if unexpected:
            errors.insert(0, "Unexpected key(s) in state_dict: {}. ".format(", ".join(f'"{k}"' for k in unexpected)))
        if missing:
            errors.insert(0, "Missing key(s) in state_dict: {}. ".format(", ".join(f'"{k}"' for k in missing)))
    if errors:
        raise RuntimeError(
            "Error(s) in loading state_dict for {}:\n\t{}".format(type(model).__name__, "\n\t".join(errors))
        )
    return _IncompatibleKeys(missing, unexpected)
