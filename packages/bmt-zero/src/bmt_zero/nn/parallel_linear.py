"""Column- and row-parallel linear layers (Megatron style, with sequence-parallel activations).

Activations are sharded along dim 0 over the tensor-parallel group; see ``_tp_ops``. Weights are
split over the tp group (``tp_mode=True``) and each slice is ZeRO-sharded over the tp_zero group;
state dicts hold the whole, un-split tensors.
"""

from __future__ import annotations

import torch

from ..module import DistributedModule
from ..parameter import DistributedParameter, ParameterInitializer
from ._tp_ops import OpParallelLinear, ReduceType, tp_comm
from .linear import check_features

__all__ = ["ColumnParallelLinear", "RowParallelLinear", "OpParallelLinear", "ReduceType", "divide"]


def divide(name: str, value: int, tp_size: int) -> int:
    """``value // tp_size``; a ValueError naming the rule when it does not divide."""
    if value % tp_size != 0:
        raise ValueError(f"{name} ({value}) must be divisible by tp_size ({tp_size})")
    return value // tp_size


class ColumnParallelLinear(DistributedModule):
    """Weight ``(out_features/tp, in_features)``: each tp rank computes a slice of the output features.

    ``gather_input=True``: the input is dim-0 sharded over tp and all-gathered (in
    ``async_gather_chunks`` rounds overlapping the matmul); the output then has all rows.
    ``gather_input=False``: the input is replicated over tp. The output's last dim is
    ``out_features/tp``, or ``out_features`` with ``gather_output=True``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        dtype: torch.dtype | None = None,
        gather_output: bool = False,
        gather_input: bool = True,
        async_gather_chunks: int = 2,
    ) -> None:
        super().__init__()
        check_features(
            in_features=in_features, out_features=out_features, async_gather_chunks=async_gather_chunks
        )
        tp = tp_comm().size
        self.in_features = in_features
        self.out_features = out_features
        self.out_features_per_partition = divide("out_features", out_features, tp)
        self.gather_output = gather_output
        self.gather_input = gather_input
        self.async_gather_chunks = async_gather_chunks
        self.weight = DistributedParameter(
            torch.empty((self.out_features_per_partition, in_features), dtype=dtype, device="meta"),
            init_method=ParameterInitializer(torch.nn.init.xavier_normal_),
            tp_mode=True,
            tp_split_dim=0,
        )
        if bias:
            self.bias = DistributedParameter(
                torch.empty((self.out_features_per_partition,), dtype=dtype, device="meta"),
                init_method=ParameterInitializer(torch.nn.init.zeros_),
                tp_mode=True,
                tp_split_dim=0,
            )
        else:
            self.register_parameter("bias", None)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = OpParallelLinear.apply(  # type: ignore[no-untyped-call]
            input, self.weight, self.bias, self.gather_input, self.gather_output, False, None,
            self.async_gather_chunks,
        )
        return out

    def extra_repr(self) -> str:
        has_bias = self._parameters.get("bias") is not None  # attribute access would all-gather
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={has_bias}, "
            f"out_features_per_partition={self.out_features_per_partition}, "
            f"gather_input={self.gather_input}, gather_output={self.gather_output}"
        )


class RowParallelLinear(DistributedModule):
    """Weight ``(out_features, in_features/tp)``: each tp rank computes a partial sum of the output.

    The input's last dim is this rank's ``in_features/tp`` slice (as a column-parallel layer
    leaves it); with ``split_input=True`` the input is instead the dim-0 shard of a full-feature
    activation, all-gathered and then split on the last dim. Partial outputs are summed by a
    reduce-scatter on dim 0 (each rank gets its rows; the default, overlapped with the matmul in
    ``async_chunks`` rounds) or, with ``all_reduce_output=True``, an all-reduce (every rank gets
    all rows). The bias ``(out_features,)`` is added after the sum.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        dtype: torch.dtype | None = None,
        split_input: bool = False,
        all_reduce_output: bool = False,
        async_chunks: int = 2,
    ) -> None:
        super().__init__()
        check_features(in_features=in_features, out_features=out_features, async_chunks=async_chunks)
        tp = tp_comm().size
        self.in_features = in_features
        self.out_features = out_features
        self.in_features_per_partition = divide("in_features", in_features, tp)
        self.split_input = split_input
        self.all_reduce_output = all_reduce_output
        self.async_chunks = async_chunks
        self.weight = DistributedParameter(
            torch.empty((out_features, self.in_features_per_partition), dtype=dtype, device="meta"),
            init_method=ParameterInitializer(torch.nn.init.xavier_normal_),
            tp_mode=True,
            tp_split_dim=1,
        )
        if bias:
            # After an all-reduce every tp rank sees the whole output, so the bias gradient is
            # whole on each one: shard it over tp_zero only. After a reduce-scatter each rank
            # sees its rows only, so the gradient must also be summed over the tp group: the
            # zero group (which contains it) does that in the ZeRO reduce-scatter.
            self.bias = DistributedParameter(
                torch.empty((out_features,), dtype=dtype, device="meta"),
                init_method=ParameterInitializer(torch.nn.init.zeros_),
                tp_mode=all_reduce_output,
                tp_split_dim=-1,
            )
        else:
            self.register_parameter("bias", None)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        reduce = ReduceType.ALL_REDUCE if self.all_reduce_output else ReduceType.REDUCE_SCATTER
        out: torch.Tensor = OpParallelLinear.apply(  # type: ignore[no-untyped-call]
            input, self.weight, None, self.split_input, False, self.split_input, reduce, self.async_chunks
        )
        bias = self.bias
        return out if bias is None else out + bias

    def extra_repr(self) -> str:
        has_bias = self._parameters.get("bias") is not None  # attribute access would all-gather
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={has_bias}, "
            f"in_features_per_partition={self.in_features_per_partition}, "
            f"split_input={self.split_input}, all_reduce_output={self.all_reduce_output}"
        )
