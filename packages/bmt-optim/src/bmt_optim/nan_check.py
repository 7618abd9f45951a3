"""Inf/nan check on any tensor: a Triton kernel on GPU, torch on CPU.

``check_inf_nan_`` accumulates into a flag tensor without synchronising the device, so an
optimizer can check every gradient and read one flag (after an all-reduce) at the end.
``check_inf_nan_many_`` does the same for a list of tensors in one kernel launch per dtype
(the gradients of a whole model, whatever their number).
"""

from __future__ import annotations

from collections import OrderedDict, defaultdict
from collections.abc import Iterable

import bmt_comm
import torch

from ._triton_support import Backend, backend_for

__all__ = ["check_inf_nan_", "check_inf_nan_many_", "has_inf_nan", "new_flag"]

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_CHUNK = 1 << 24  # torch fallback: bounds the temporary bool mask to 16 Mi elements


def new_flag(device: torch.device | str) -> torch.Tensor:
    """A fresh flag: int32 ``(1,)``, 0 = all finite so far."""
    return torch.zeros(1, dtype=torch.int32, device=device)


def _check_flag(tensor: torch.Tensor, flag: torch.Tensor) -> None:
    if flag.dtype != torch.int32 or flag.numel() != 1:
        raise TypeError(
            f"the inf/nan flag must be a 1-element int32 tensor (see new_flag), "
            f"got dtype {flag.dtype} with {flag.numel()} elements"
        )
    if flag.device != tensor.device:
        raise ValueError(f"the inf/nan flag is on {flag.device} but the tensor is on {tensor.device}")


def check_inf_nan_(tensor: torch.Tensor, flag: torch.Tensor) -> torch.Tensor:
    """Set ``flag`` to 1 if ``tensor`` holds an inf or a nan; leave it as it was otherwise.

    Does not synchronise the device. Integer and bool tensors are always finite. Returns ``flag``.
    """
    _check_flag(tensor, flag)
    if tensor.numel() == 0 or not (tensor.is_floating_point() or tensor.is_complex()):
        return flag
    if tensor.is_complex():
        tensor = torch.view_as_real(tensor)
    flat = tensor.reshape(-1)
    if flat.dtype in _TRITON_DTYPES and backend_for(flat) is Backend.TRITON:
        from ._nan_kernels import flag_non_finite

        flag_non_finite(flat.contiguous(), flag)
        return flag
    for chunk in torch.split(flat, _CHUNK):
        if chunk.dtype not in _TRITON_DTYPES:
            chunk = chunk.to(torch.float32)  # fp8 and friends: isfinite needs a wider type
        bad = torch.logical_not(torch.isfinite(chunk)).any()
        flag.bitwise_or_(bad.to(torch.int32))
    return flag


_TableKey = tuple[torch.device, torch.dtype, tuple[tuple[int, int], ...]]


class _Tables(OrderedDict[_TableKey, tuple[torch.Tensor, torch.Tensor]]):
    """Chunk tables by layout, least recently used first (a ``process_state`` slot)."""


_MAX_TABLES = 16  # chunk tables kept: gradients keep their addresses from step to step


def _chunk_table(key: _TableKey, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(starts, lens) of every ``chunk``-element piece of the tensors in ``key``, as element
    offsets from the first tensor; built once per layout, then reused with no host work."""
    tables = bmt_comm.process_state().slot(_Tables)
    table = tables.get(key)
    if table is not None:
        tables.move_to_end(key)
        return table
    device, dtype, layout = key
    size = torch.empty((), dtype=dtype).element_size()
    base = layout[0][0]
    starts, lens = [], []
    for ptr, n in layout:
        local = torch.arange(0, n, chunk, dtype=torch.int64)
        starts.append(local + (ptr - base) // size)
        lens.append((n - local).clamp_(max=chunk))
    table = (torch.cat(starts).to(device), torch.cat(lens).to(device))
    tables[key] = table
    if len(tables) > _MAX_TABLES:
        tables.popitem(last=False)
    return table


def check_inf_nan_many_(tensors: Iterable[torch.Tensor], flag: torch.Tensor) -> torch.Tensor:
    """``check_inf_nan_`` over every tensor, all on ``flag``'s device, in one pass per dtype.

    With Triton, the contiguous tensors of each float dtype are read by one kernel launch
    (a cached table of chunks locates them); the rest go through ``check_inf_nan_`` one by one.
    Does not synchronise the device. Returns ``flag``.
    """
    groups: defaultdict[torch.dtype, list[torch.Tensor]] = defaultdict(list)
    for t in tensors:
        _check_flag(t, flag)
        if t.numel() == 0:
            continue
        fused = t.dtype in _TRITON_DTYPES and t.is_contiguous() and backend_for(t) is Backend.TRITON
        if fused and t.data_ptr() % t.element_size() == 0:
            groups[t.dtype].append(t)
        else:
            check_inf_nan_(t, flag)
    if not groups:
        return flag
    from ._nan_kernels import MULTI_CHUNK, flag_non_finite_chunks

    for dtype, ts in groups.items():
        key = (flag.device, dtype, tuple((t.data_ptr(), t.numel()) for t in ts))
        starts, lens = _chunk_table(key, MULTI_CHUNK)
        flag_non_finite_chunks(ts[0], starts, lens, flag)
    return flag


def has_inf_nan(tensor: torch.Tensor) -> bool:
    """True if ``tensor`` holds an inf or a nan (synchronises the device to read the answer)."""
    flag = new_flag(tensor.device)
    check_inf_nan_(tensor, flag)
    return bool(flag.item())
