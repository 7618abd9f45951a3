"""The end of a load: torch's report of missing and unexpected keys, and its error message."""

from __future__ import annotations

import torch
from torch.nn.modules.module import _IncompatibleKeys

__all__ = ["finish_load", "load_problems"]


def load_problems(
    model: torch.nn.Module, missing: list[str], unexpected: list[str], errors: list[str], strict: bool
) -> str | None:
    """torch's ``load_state_dict`` message for these problems (key problems first under
    ``strict``), or None if it would not raise."""
    errors = list(errors)
    if strict:
        if unexpected:
            errors.insert(0, "Unexpected key(s) in state_dict: {}. ".format(", ".join(f'"{k}"' for k in unexpected)))
        if missing:
            errors.insert(0, "Missing key(s) in state_dict: {}. ".format(", ".join(f'"{k}"' for k in missing)))
    if not errors:
        return None
    return "Error(s) in loading state_dict for {}:\n\t{}".format(type(model).__name__, "\n\t".join(errors))


def finish_load(
    model: torch.nn.Module, missing: list[str], unexpected: list[str], errors: list[str], strict: bool
) -> _IncompatibleKeys:
    """Raise as ``torch.nn.Module.load_state_dict`` does, else return the keys."""
    message = load_problems(model, missing, unexpected, errors, strict)
    if message is not None:
        raise RuntimeError(message)
    return _IncompatibleKeys(missing, unexpected)
