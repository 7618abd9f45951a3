"""What a model is, for telling a checkpoint of another model apart before anything is loaded:
each parameter's and persistent buffer's name, whole shape and dtype."""

from __future__ import annotations

import torch
from bmt_zero import DistributedParameter

__all__ = ["Signature", "local_signature", "signature_mismatch", "union"]

Signature = list[tuple[str, tuple[int, ...], str]]
_SHOWN = 5  # differences named in one message


def _whole_shape(t: torch.Tensor) -> tuple[int, ...]:
    if isinstance(t, DistributedParameter):  # a ZeRO shard: the shape of the whole (tp-joined) parameter
        return tuple(t.tp_original_shape if t.tp_mode else t.original_shape)
    return tuple(t.shape)


def local_signature(model: torch.nn.Module) -> Signature:
    """The tensors held on this rank (a pipeline stage holds its own layers), sorted by name."""
    out: dict[str, tuple[str, tuple[int, ...], str]] = {}
    for mod_name, module in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        tensors = [(n, t) for n, t in module._parameters.items() if t is not None]
        tensors += [(n, b) for n, b in module._buffers.items()
                    if b is not None and n not in module._non_persistent_buffers_set]
        for n, t in tensors:
            out[prefix + n] = (prefix + n, _whole_shape(t), str(t.dtype).removeprefix("torch."))
    return sorted(out.values())


def signature_mismatch(saved: Signature, model: Signature) -> str | None:
    """How the model differs from the checkpoint's, or None when they agree."""
    a = {name: (tuple(shape), dtype) for name, shape, dtype in saved}
    b = {name: (tuple(shape), dtype) for name, shape, dtype in model}
    problems = [f"{k} is not in the checkpoint" for k in b if k not in a]
    problems += [f"{k} is in the checkpoint but not in the model" for k in a if k not in b]
    for k in b:
        if k in a and a[k] != b[k]:
            problems.append(f"{k} is {list(b[k][0])} {b[k][1]} here but {list(a[k][0])} {a[k][1]} in the checkpoint")
    if not problems:
        return None
    more = f" (and {len(problems) - _SHOWN} more)" if len(problems) > _SHOWN else ""
    return f"the model does not match the checkpoint's: {'; '.join(problems[:_SHOWN])}{more}"


def union(signatures: list[Signature]) -> Signature:
    """The whole model's tensors from every rank's (a pipeline stage holds a part of them)."""
    return sorted({(name, tuple(shape), dtype) for sig in signatures for name, shape, dtype in sig})
