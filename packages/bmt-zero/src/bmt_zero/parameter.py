"""``DistributedParameter``: a parameter of which each rank keeps one shard."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import bmt_comm
import torch
from bmt_comm import Communicator

from .partition import Partition

__all__ = ["DistributedParameter", "ParameterInitializer", "InitMethod"]

InitMethod = Callable[[torch.Tensor], Any]


class ParameterInitializer:
    """Partial application: ``ParameterInitializer(f, *a, **k)(t)`` runs ``f(t, *a, **k)``."""

    def __init__(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        self.func = func
        self._args = args
        self._kwargs = kwargs

    def __call__(self, param: torch.Tensor) -> None:
        self.func(param, *self._args, **self._kwargs)

    def __repr__(self) -> str:
        name = getattr(self.func, "__name__", repr(self.func))
        return f"ParameterInitializer({name}, args={self._args}, kwargs={self._kwargs})"


def _shape_of(data: torch.Tensor | Sequence[int]) -> torch.Size:
    if isinstance(data, torch.Tensor):
        return data.shape
    shape = torch.Size(data)
    if any(not isinstance(d, int) or d < 0 for d in shape):
        raise ValueError(f"a DistributedParameter shape must be non-negative ints, got {tuple(data)}")
    return shape


class DistributedParameter(torch.nn.Parameter):
    """A parameter sharded over the zero group (over the tp_zero group in ``tp_mode``).

    ``data`` is the full logical tensor (in ``tp_mode``: this tensor-parallel rank's slice), a
    ``meta`` tensor, or just a shape; in the last two cases nothing larger than the shard is ever
    allocated and values come from ``init_method`` (see ``init_parameters``) or a checkpoint.
    The parameter itself is 1-D: this rank's ``[shard_start, shard_end)`` slice of the flattened
    tensor (a ``bmt_comm.Shard``; ``_start_partition``/``_end_partition`` are 1.0.1's names of the
    same two numbers). ``gather()`` rebuilds the full tensor, differentiably.

    The private fields below belong to bmt-zero: this class sets them, and its flat storage moves
    them with ``_bind_storage``; other packages read the public properties.
    """

    _original_shape: torch.Size
    _start_partition: int
    _end_partition: int
    _init_method: InitMethod | None
    _in_block: bool
    _group: str | None
    _tp_mode: bool
    _tp_split_dim: int
    _tp_original_shape: torch.Size
    _zero_comm: Communicator
    _partition: Partition

    def __new__(
        cls,
        data: torch.Tensor | Sequence[int],
        requires_grad: bool = True,
        init_method: InitMethod | None = None,
        group: str | None = None,
        tp_mode: bool = False,
        tp_split_dim: int = -1,
        *,
        dtype: torch.dtype | None = None,
    ) -> DistributedParameter:
        ctx = bmt_comm.get_context()
        shape = _shape_of(data)
        if isinstance(data, torch.Tensor):
            if dtype is not None and dtype != data.dtype:
                raise TypeError(f"dtype ({dtype}) differs from the data's dtype ({data.dtype})")
            dtype = data.dtype
        dtype = dtype or torch.get_default_dtype()
        if not -1 <= tp_split_dim < max(len(shape), 1):
            raise ValueError(f"tp_split_dim ({tp_split_dim}) must be -1 or a dim of shape {tuple(shape)}")
        comm = ctx.comms.tp_zero if tp_mode else ctx.comms.zero
        part = Partition(shape.numel(), comm.size, comm.rank)

        shard = torch.zeros(part.local_numel, dtype=dtype, device=ctx.device)
        if isinstance(data, torch.Tensor) and data.device.type != "meta":
            shard.copy_(data.detach().reshape(-1)[part.start : part.end])
        self = torch.Tensor._make_subclass(cls, shard, requires_grad)
        self._original_shape = shape
        self._partition = part
        self._start_partition = part.start
        self._end_partition = part.end
        self._init_method = init_method
        self._in_block = False
        self._group = group if group is not None else ("tp" if tp_mode else None)
        self._tp_mode = tp_mode
        self._tp_split_dim = tp_split_dim
        self._zero_comm = comm
        tp_shape = list(shape)
        if tp_mode and tp_split_dim >= 0:
            tp_shape[tp_split_dim] *= ctx.comms.tp.size
        self._tp_original_shape = torch.Size(tp_shape)
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # everything happens in __new__
        pass

    @property
    def group(self) -> str | None:
        return self._group

    # --- what other packages read (1.0.1's private fields, under public names) -----------------
    @property
    def original_shape(self) -> torch.Size:
        """The shape of the whole parameter (in ``tp_mode``: of this tensor-parallel rank's slice)."""
        return self._original_shape

    @property
    def tp_mode(self) -> bool:
        """Whether the parameter is split over the tensor-parallel group."""
        return self._tp_mode

    @property
    def tp_split_dim(self) -> int:
        """The dim the tensor-parallel ranks' slices are cut along (-1: each holds it whole)."""
        return self._tp_split_dim

    @property
    def tp_original_shape(self) -> torch.Size:
        """The shape of the model's whole logical tensor (the tensor-parallel slices joined)."""
        return self._tp_original_shape

    @property
    def init_method(self) -> InitMethod | None:
        """What ``init_parameters`` runs on the whole parameter (None: it keeps its values); 1.0.1's
        ``_init_method``, which stays writable too."""
        return self._init_method

    @init_method.setter
    def init_method(self, fn: InitMethod | None) -> None:
        if fn is not None and not callable(fn):
            raise TypeError(f"init_method must be callable (it is called on the whole tensor) or None, got {fn!r}")
        self._init_method = fn

    @property
    def in_block(self) -> bool:
        """Whether a Block's flat storage holds the parameter (its data is a view into it)."""
        return self._in_block

    # --- the bmt_comm.Shard protocol: what the optimizer and gradient clipping read ------------
    @property
    def shard_start(self) -> int:
        """First element of the flattened (tp-local) whole parameter held by this rank."""
        return self._start_partition

    @property
    def shard_end(self) -> int:
        """One past the last element held by this rank."""
        return self._end_partition

    @property
    def whole_numel(self) -> int:
        """Elements of the whole (in ``tp_mode``: tp-local) parameter."""
        return self._original_shape.numel()

    @property
    def shard_comm(self) -> Communicator:
        """The group whose ranks hold the pieces: zero (tp_zero), or a Block storage's group."""
        return self._zero_comm

    def _bind_storage(self, view: torch.Tensor, start: int, end: int, comm: Communicator) -> None:
        """Flat storage took this parameter: ``view`` (of the storage's shard) is its data now,
        holding elements ``[start, end)``, whose pieces lie over ``comm``, in rank order."""
        self.grad = None  # a gradient of the old shard has no place in the flat storage
        self.data = view
        self._in_block = True
        self._start_partition, self._end_partition = start, end
        self._zero_comm = comm

    def gather(self) -> torch.Tensor:  # type: ignore[override]  # the reference's API, not Tensor.gather
        """The full tensor of ``_original_shape`` (all-gathered); its gradient returns to the shard.

        Over a group of one it is a view of the parameter (nothing is copied, as in plain torch):
        unlike 1.0.1's new tensor, writing into it under ``no_grad`` changes the parameter."""
        if self._in_block:
            raise RuntimeError(
                "gather() is for parameters outside a Block; inside a Block the parameter is "
                "already full during the block's forward and backward"
            )
        if self._zero_comm.size == 1:
            # a group of one holds the whole tensor: a view, used in place as plain torch would
            return self.view(self._original_shape)
        out: torch.Tensor = _Gather.apply(self)  # type: ignore[no-untyped-call]
        return out

    def tp_gather(self) -> torch.Tensor:
        """Concatenate the tensor-parallel slices of the current (full, zero-gathered) value."""
        full = self if self._in_block else self.gather()
        return _tp_concat(full, self._tp_split_dim) if self._tp_mode else full

    def gather_all(self) -> torch.Tensor:
        """Zero gather, then the tensor-parallel gather: the model's whole logical tensor."""
        full = self.gather()
        return _tp_concat(full, self._tp_split_dim) if self._tp_mode else full

    def _copy_data(self, data: torch.Tensor) -> None:
        """Keep this rank's slice of the full (in tp_mode: tp-local) tensor ``data``."""
        if data.shape != self._original_shape:
            raise ValueError(
                f"expected a tensor of shape {tuple(self._original_shape)} for this parameter, "
                f"got {tuple(data.shape)}"
            )
        with torch.no_grad():
            self.data.copy_(data.detach().reshape(-1)[self._start_partition : self._end_partition])

    def __repr__(self) -> str:  # type: ignore[override]
        return (
            f"DistributedParameter(shape={tuple(self._original_shape)}, dtype={self.dtype}, "
            f"shard=[{self._start_partition}, {self._end_partition}), group={self._group!r}, "
            f"tp_mode={self._tp_mode}, requires_grad={self.requires_grad})"
        )

    def __reduce_ex__(self, proto: Any) -> Any:
        raise TypeError(
            "a DistributedParameter holds only this rank's shard and cannot be pickled; "
            "save the model with bmt.save() or model.state_dict()"
        )


def _tp_concat(full: torch.Tensor, split_dim: int) -> torch.Tensor:
    tp = bmt_comm.get_context().comms.tp
    if tp.size == 1 or split_dim < 0:
        return full
    stacked = bmt_comm.all_gather(full, tp)  # (tp, *full.shape)
    return torch.cat(list(stacked.unbind(0)), dim=split_dim)


class _Gather(torch.autograd.Function):
    """All-gather a shard (padded even split) into the full tensor; backward reduce-scatters (sum)."""

    @staticmethod
    def forward(ctx: Any, param: DistributedParameter) -> torch.Tensor:
        shard: torch.Tensor = param
        part, comm = param._partition, param._zero_comm
        ctx.part, ctx.comm, ctx.shard_shape = part, comm, shard.shape
        streams = bmt_comm.get_context().streams
        with torch.no_grad():
            if part.local_numel == part.shard_numel:
                src = shard.detach().reshape(-1)
            else:
                src = torch.zeros(part.shard_numel, dtype=shard.dtype, device=shard.device)
                src[: part.local_numel].copy_(shard.detach().reshape(-1))
            out = torch.empty(part.padded_numel, dtype=shard.dtype, device=shard.device)
            # the all-gather runs on the load stream so it can overlap compute queued before it
            bmt_comm.wait_stream(streams.load, bmt_comm.current_stream(shard.device))
            with bmt_comm.stream_context(streams.load):
                comm.all_gather(src, out)
                bmt_comm.record_stream(src, streams.load)
                bmt_comm.record_stream(out, streams.load)
            bmt_comm.wait_stream(bmt_comm.current_stream(shard.device), streams.load)
        return out[: part.numel].view(param._original_shape)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        part: Partition = ctx.part
        comm: Communicator = ctx.comm
        flat = grad.contiguous().view(-1)
        if part.padded_numel != part.numel:
            padded = torch.zeros(part.padded_numel, dtype=grad.dtype, device=grad.device)
            padded[: part.numel].copy_(flat)
            flat = padded
        shard = torch.empty(part.shard_numel, dtype=grad.dtype, device=grad.device)
        comm.reduce_scatter(flat, shard, bmt_comm.ReduceOp.SUM)
        return shard[: part.local_numel].view(ctx.shard_shape)
