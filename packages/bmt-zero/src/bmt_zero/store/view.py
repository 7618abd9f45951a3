"""A checkpoint read by one rank, seen as a state dict by every rank (``bmt.load``)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import bmt_comm
import torch
from bmt_comm import Communicator

from ..parameter import DistributedParameter
from .errors import CheckpointError, text_of
from .rounds import Ask, Op, agreed, exchange

__all__ = ["DistributedStateDictWrapper", "DistributedTensorWrapper", "TensorMeta"]


@dataclass(frozen=True)
class TensorMeta:
    shape: torch.Size
    dtype: torch.dtype


class DistributedStateDictWrapper(Mapping[str, Any]):
    """Keys, shapes and dtypes are known on every rank (one broadcast at construction); values
    move only when asked for, one at a time.

    ``wrapper[key]`` is a collective: the source rank sends the full tensor (for ordinary
    parameters and buffers, which their holders keep whole). ``load_shard(key, param)`` is the
    DistributedParameter path: the source sends each rank only its piece. Each read is one round
    (``rounds``): every rank must ask for the same keys in the same order, which module-by-module
    loading guarantees, except that ranks which do not hold a part of the model (another pipeline
    stage's layers) ``follow()`` while its holders load it and then say ``done()``.
    """

    _metadata: Any

    def __init__(
        self,
        state_dict: Mapping[str, Any] | None,
        comm: Communicator | None = None,
        src: int = 0,
        error: BaseException | None = None,
    ) -> None:
        self._comm = comm or bmt_comm.get_context().comms.world
        self._src = src
        is_src = self._comm.rank == src
        header: tuple[str | None, list[tuple[str, TensorMeta | None]], Any] | None = None
        if is_src:
            if error is None and state_dict is None:
                error = ValueError("the source rank must pass the state dict it read")
            entries = [] if error is not None or state_dict is None else [
                (k, TensorMeta(v.shape, v.dtype) if isinstance(v, torch.Tensor) else None)
                for k, v in state_dict.items()
            ]
            header = (None if error is None else text_of(error), entries, getattr(state_dict, "_metadata", None))
        header = bmt_comm.broadcast_object(header, self._comm, src)
        assert header is not None
        message, entries, metadata = header
        if message is not None:  # the same exception on every rank: a caller may catch it and go on
            raise CheckpointError(
                f"reading the checkpoint failed on rank {self._comm.global_ranks[src]}: {message}"
            ) from error
        self._entries: dict[str, TensorMeta | None] = dict(entries)
        # the whole checkpoint's entries, shared by restricted views: rounds name keys by index
        self._names: list[str] = [k for k, _ in entries]
        self._metas: list[TensorMeta | None] = [m for _, m in entries]
        self._index: dict[str, int] = {k: i for i, k in enumerate(self._names)}
        self._metadata = metadata
        self._state = state_dict if is_src else None

    def restrict(self, prefix: str) -> DistributedStateDictWrapper:
        """The same checkpoint, limited to keys starting with ``prefix`` (no communication)."""
        sub = object.__new__(DistributedStateDictWrapper)
        sub._comm, sub._src, sub._state, sub._metadata = self._comm, self._src, self._state, self._metadata
        sub._names, sub._metas, sub._index = self._names, self._metas, self._index
        sub._entries = {k: m for k, m in self._entries.items() if k.startswith(prefix)}
        return sub

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def shape_of(self, key: str) -> torch.Size | None:
        meta = self._entries[key]
        return None if meta is None else meta.shape

    def _source(self, key: str) -> Any:
        assert self._state is not None
        return self._state[key]

    def _round(self, ask: Ask) -> tuple[Op, int, list[Ask]]:
        asks = exchange(ask, self._comm)
        op, key = agreed(asks, self._names, self._comm.global_ranks)
        return op, key, asks

    # --- reads -------------------------------------------------------------------------------
    def __getitem__(self, key: str) -> Any:
        if key not in self._entries:
            raise KeyError(key)
        meta = self._entries[key]
        op, index, asks = self._round(Ask(Op.OBJECT if meta is None else Op.FULL, self._index[key]))
        return self._serve(op, index, asks, None)

    def load_shard(self, key: str, param: DistributedParameter) -> None:
        """Collective: every rank's piece of ``key`` (tp-split for tp params) lands in its ``param``."""
        split = param._tp_mode and param._tp_split_dim >= 0
        ask = Ask(
            Op.SHARD,
            self._index[key],
            tp_rank=bmt_comm.get_context().comms.tp.rank if split else 0,
            split_dim=param._tp_split_dim if split else -1,
            split_size=param._original_shape[param._tp_split_dim] if split else 0,
            start=param._start_partition,
            end=param._end_partition,
        )
        op, index, asks = self._round(ask)
        with torch.no_grad():
            self._serve(op, index, asks, param.data.view(-1))

    def follow(self) -> None:
        """Collective: take part in the reads of the ranks that hold the part of the model being
        loaded, receiving nothing (serving them, on the source rank), until they are ``done()``."""
        while True:
            op, index, asks = self._round(Ask(Op.IDLE))
            if op is Op.DONE:
                return
            self._serve(op, index, asks, None)

    def done(self) -> None:
        """Collective: the holders of the part just loaded release the ranks that ``follow()``."""
        op, _, _ = self._round(Ask(Op.DONE))
        assert op is Op.DONE

    # --- transfers -----------------------------------------------------------------------------
    def _serve(self, op: Op, index: int, asks: list[Ask], target: torch.Tensor | None) -> Any:
        comm = self._comm
        name = self._names[index] if index >= 0 else ""
        if op is Op.OBJECT:
            return bmt_comm.broadcast_object(self._source(name) if comm.rank == self._src else None, comm, self._src)
        if op is Op.FULL:
            return self._send_full(name, index, asks)
        if op is Op.SHARD:
            self._send_shards(name, index, asks, target)
        return None

    def _send_full(self, name: str, index: int, asks: list[Ask]) -> torch.Tensor | None:
        comm = self._comm
        wanting = [r for r, a in enumerate(asks) if a.op is Op.FULL]
        if comm.rank == self._src:
            out: torch.Tensor | None = self._source(name).detach().to(comm.device).contiguous()
        elif comm.rank in wanting:
            meta = self._metas[index]
            assert meta is not None
            out = torch.empty(meta.shape, dtype=meta.dtype, device=comm.device)
        else:
            return None
        assert out is not None
        if len(wanting) == comm.size:
            comm.broadcast(out, self._src)
            return out
        with comm.group():
            if comm.rank == self._src:
                for r in wanting:
                    if r != comm.rank:
                        comm.send(out, r)
            else:
                comm.recv(out, self._src)
        return out if comm.rank in wanting else None

    def _send_shards(self, name: str, index: int, asks: list[Ask], target: torch.Tensor | None) -> None:
        comm = self._comm
        if comm.rank != self._src:
            mine = asks[comm.rank]
            if mine.end > mine.start:
                assert target is not None
                meta = self._metas[index]
                assert meta is not None
                buf = torch.empty(mine.end - mine.start, dtype=meta.dtype, device=comm.device)
                with comm.group():
                    comm.recv(buf, self._src)
                target.copy_(buf)
            return
        full = self._source(name).detach()
        slices: dict[tuple[int, int, int], torch.Tensor] = {}  # flat tp slices: one full tensor at most
        sent: list[torch.Tensor] = []  # alive until the group is posted
        with comm.group():
            for r, ask in enumerate(asks):
                if ask.op is not Op.SHARD or ask.end <= ask.start:
                    continue
                split = (ask.tp_rank, ask.split_dim, ask.split_size)
                if split not in slices:
                    slices[split] = ask.tp_slice(full)
                piece = slices[split][ask.start : ask.end]
                if r == comm.rank:
                    assert target is not None
                    target.copy_(piece)
                else:
                    piece = piece.to(comm.device).contiguous()
                    sent.append(piece)
                    comm.send(piece, r)
        del sent, slices


class DistributedTensorWrapper:
    """One entry of a :class:`DistributedStateDictWrapper`, fetched only when asked for."""

    def __init__(self, state: DistributedStateDictWrapper, key: str) -> None:
        meta = state._entries[key]
        if meta is None:
            raise TypeError(f"checkpoint entry {key!r} is not a tensor")
        self._state = state
        self.key = key
        self.shape = meta.shape
        self.dtype = meta.dtype

    def size(self) -> torch.Size:
        return self.shape

    def broadcast(self) -> torch.Tensor:
        """Collective: the full tensor on every rank."""
        out: torch.Tensor = self._state[self.key]
        return out

    def load_shard(self, param: DistributedParameter) -> None:
        """Collective: this rank's piece into ``param``."""
        self._state.load_shard(self.key, param)
