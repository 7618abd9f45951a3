"""A checkpoint read by one rank, seen as a state dict by every rank (``bmt.load``)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import bmt_comm
import torch
from bmt_comm import Communicator

from ..gather import tp_chunk
from ..parameter import DistributedParameter
from .atomic import describe

__all__ = ["DistributedStateDictWrapper", "DistributedTensorWrapper", "TensorMeta"]


@dataclass(frozen=True)
class TensorMeta:
    shape: torch.Size
    dtype: torch.dtype


class DistributedStateDictWrapper(Mapping[str, Any]):
    """Keys, shapes and dtypes are known on every rank (one broadcast at construction); values
    move only when asked for, one at a time.

    ``wrapper[key]`` is a collective: the source rank broadcasts the full tensor (for ordinary
    parameters and buffers, which every rank holds whole). ``load_shard(key, param)`` is the
    DistributedParameter path: the source sends each rank only its piece. Every rank must ask
    for the same keys in the same order, which module-by-module loading guarantees.
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
            header = (describe(error), entries, getattr(state_dict, "_metadata", None))
        header = bmt_comm.broadcast_object(header, self._comm, src)
        assert header is not None
        message, entries, metadata = header
        if message is not None:
            if error is not None:
                raise error
            raise RuntimeError(f"reading the checkpoint failed on rank {self._comm.global_ranks[src]}: {message}")
        self._entries: dict[str, TensorMeta | None] = dict(entries)
        self._metadata = metadata
        self._state = state_dict if is_src else None

    def restrict(self, prefix: str) -> DistributedStateDictWrapper:
        """The same checkpoint, limited to keys starting with ``prefix`` (no communication)."""
        sub = object.__new__(DistributedStateDictWrapper)
        sub._comm, sub._src, sub._state, sub._metadata = self._comm, self._src, self._state, self._metadata
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

    def __getitem__(self, key: str) -> Any:
        if key not in self._entries:
            raise KeyError(key)
        meta = self._entries[key]
        comm = self._comm
        if meta is None:
            return bmt_comm.broadcast_object(self._source(key) if comm.rank == self._src else None, comm, self._src)
        if comm.rank == self._src:
            out = self._source(key).detach().to(comm.device).contiguous()
        else:
            out = torch.empty(meta.shape, dtype=meta.dtype, device=comm.device)
        comm.broadcast(out, self._src)
        return out

    def load_shard(self, key: str, param: DistributedParameter) -> None:
        """Collective: every rank's piece of ``key`` (tp-split for tp params) lands in its ``param``."""
        comm = self._comm
        tp_rank = bmt_comm.get_context().comms.tp.rank if param._tp_mode else 0
        mine = torch.tensor([tp_rank, param._start_partition, param._end_partition], dtype=torch.int64,
                            device=comm.device)
        rows = torch.empty(3 * comm.size, dtype=torch.int64, device=comm.device)
        comm.all_gather(mine, rows)
        flat = rows.tolist()
        wanted = [(flat[3 * r], flat[3 * r + 1], flat[3 * r + 2]) for r in range(comm.size)]
        target = param.data.view(-1)
        with torch.no_grad():
            if comm.rank != self._src:
                _, start, end = wanted[comm.rank]
                if end > start:
                    buf = torch.empty(end - start, dtype=param.dtype, device=comm.device)
                    with comm.group():
                        comm.recv(buf, self._src)
                    target.copy_(buf)
                return
            full = self._source(key).detach()
            chunks: dict[int, torch.Tensor] = {}
            sent: list[torch.Tensor] = []  # alive until the group is posted
            with comm.group():
                for r, (t, start, end) in enumerate(wanted):
                    if end <= start:
                        continue
                    if t not in chunks:
                        chunks[t] = tp_chunk(full, param, t).reshape(-1)
                    piece = chunks[t][start:end].to(device=comm.device, dtype=param.dtype).contiguous()
                    if r == comm.rank:
                        target.copy_(piece)
                    else:
                        sent.append(piece)
                        comm.send(piece, r)
            del sent, chunks


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
