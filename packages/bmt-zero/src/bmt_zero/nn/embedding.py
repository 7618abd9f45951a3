"""``VPEmbedding``: a vocabulary-parallel embedding that doubles as the output projection."""

from __future__ import annotations

import torch

from ..module import DistributedModule
from ..parameter import DistributedParameter, ParameterInitializer
from ._tp_ops import OpParallelLinear, tp_comm, vocab_parallel_embedding
from .linear import check_features
from .parallel_linear import divide

__all__ = ["VPEmbedding"]


class VPEmbedding(DistributedModule):
    """Tp rank ``r`` holds rows ``[start_index, end_index)`` of the ``(vocab_size, embedding_size)`` table.

    ``forward(ids)``: the embeddings of ``ids`` (any int tensor; tp ranks may pass different ids
    of the same shape, e.g. their dim-0 shards). Only ids and embeddings travel, never the table.
    ``forward(x, projection=True)``: ``x`` is this rank's ``(n, s, embedding_size)`` dim-0 shard
    of the hidden states (any ``(n, ..., embedding_size)``); returns the logits of every tp rank's
    rows over this rank's vocabulary slice with 1.0.1's shape ``(n, tp*s, vocab_size/tp)``: the
    ``(tp*n, s, vocab_size/tp)`` result of the gathered rows, viewed (not transposed) as 1.0.1
    does. ``logits.view(-1, vocab_size/tp)`` lists the rows in tp-rank order, the input
    ``FusedCrossEntropy(parallel=True)`` expects with the whole ``(tp*n*s,)`` targets (global ids).
    """

    def __init__(
        self,
        vocab_size: int,
        embedding_size: int,
        dtype: torch.dtype = torch.half,
        init_mean: float = 0.0,
        init_std: float = 1,
        async_gather_chunks: int = 2,
    ) -> None:
        super().__init__()
        check_features(
            vocab_size=vocab_size, embedding_size=embedding_size, async_gather_chunks=async_gather_chunks
        )
        comm = tp_comm()
        self.vocab_size = vocab_size
        self.dim_model = embedding_size
        self.vocab_size_per_partition = divide("vocab_size", vocab_size, comm.size)
        self.start_index = comm.rank * self.vocab_size_per_partition
        self.end_index = self.start_index + self.vocab_size_per_partition
        self.async_gather_chunks = async_gather_chunks
        self.weight = DistributedParameter(
            torch.empty((self.vocab_size_per_partition, embedding_size), dtype=dtype, device="meta"),
            init_method=ParameterInitializer(torch.nn.init.normal_, mean=init_mean, std=init_std),
            tp_mode=True,
            tp_split_dim=0,
        )

    def forward(self, x: torch.Tensor, projection: bool = False) -> torch.Tensor:
        if projection:
            logits: torch.Tensor = OpParallelLinear.apply(  # type: ignore[no-untyped-call]
                x, self.weight, None, True, False, False, None, self.async_gather_chunks
            )  # (tp*n, ..., V/tp), rows in tp-rank order
            # 1.0.1 views the gathered (tp, n, ...) input as (n, -1, d): the same memory, new shape
            return logits.view(x.shape[0], -1, logits.shape[-1])  # (n, tp*s, V/tp)
        return vocab_parallel_embedding(x, self.weight, self.start_index, self.vocab_size, tp_comm())

    def extra_repr(self) -> str:
        return (
            f"vocab_size={self.vocab_size}, embedding_size={self.dim_model}, "
            f"vocab_size_per_partition={self.vocab_size_per_partition}, "
            f"start_index={self.start_index}, end_index={self.end_index}"
        )
