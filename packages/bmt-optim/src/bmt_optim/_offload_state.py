"""Whole (unsharded) optimizer state from ZeRO shards, and shards back from whole state.

A parameter that is a ``bmt_comm.Shard`` (a bmt-zero ``DistributedParameter``, a flat storage
tensor, or any tensor carrying the protocol's attributes) holds elements
``[shard_start, shard_end)`` of the flattened whole parameter, whose pieces lie over its
``shard_comm``. Any other parameter is whole. Nothing here assumes how shards are sized: each
rank's range is exchanged once per call.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from bmt_comm import Communicator, check_shard

__all__ = ["ShardRange", "gather_state", "shard_of", "slice_whole"]

_GATHER_CHUNK = 1 << 24  # elements per rank per all-gather: bounds the device buffers used


class ShardRange(NamedTuple):
    start: int
    end: int
    numel: int  # of the whole (flattened) parameter
    comm: Communicator  # the group holding the pieces


def shard_of(p: torch.Tensor) -> ShardRange | None:
    """The part of the whole parameter that ``p`` holds, or None when ``p`` is whole."""
    sh = check_shard(p)
    if sh is None:
        return None
    return ShardRange(sh.shard_start, sh.shard_end, sh.whole_numel, sh.shard_comm)


class _Local(NamedTuple):
    """This rank's part of one sharded parameter, as exchanged between ranks."""

    start: int
    end: int
    step: int | None  # None: no state here yet
    keys: tuple[str, ...]  # state tensors present here


def gather_state(
    params: list[torch.Tensor], state: Mapping[torch.Tensor, Mapping[str, Any]], keys: tuple[str, ...]
) -> tuple[dict[int, dict[str, Any]], bool]:
    """Whole state by parameter index (collective over each sharded parameter's group).

    Returns ``(state, is_root)``: the state is complete only where ``is_root`` (rank 0 of every
    group involved); other ranks get an empty dict. Tensors are flat fp32 on the CPU.
    """
    import bmt_comm

    comms: dict[int, Communicator] = {}
    members: dict[int, list[tuple[int, ShardRange]]] = {}  # comm id -> its sharded params, in order
    out: dict[int, dict[str, Any]] = {}
    for i, p in enumerate(params):
        sh = shard_of(p)
        if sh is not None and sh.comm.size > 1:
            comms.setdefault(id(sh.comm), sh.comm)
            members.setdefault(id(sh.comm), []).append((i, sh))
        elif state.get(p):  # whole, or the only shard of a one-rank group
            out[i] = _local_whole(state[p], sh, keys)
    for cid, comm in comms.items():
        mine = []
        for i, sh in members[cid]:
            st = state.get(params[i])
            present = tuple(k for k in keys if st and k in st)
            mine.append(_Local(sh.start, sh.end, st["step"] if st else None, present))
        everyone: list[list[_Local]] = bmt_comm.allgather_objects(mine, comm)
        for j, (i, sh) in enumerate(members[cid]):
            parts = [r[j] for r in everyone]
            stepped = [x for x in parts if x.step is not None]
            if not stepped:
                continue  # no rank has stepped this parameter yet
            st = state.get(params[i])
            entry: dict[str, Any] = {"step": max(x.step for x in stepped if x.step is not None)}
            for k in stepped[0].keys:
                whole = _gather_one(comm, st[k].detach().reshape(-1) if st else None, parts, sh.numel)
                if whole is not None:
                    entry[k] = whole
            if comm.rank == 0:
                out[i] = entry
    is_root = all(c.rank == 0 for c in comms.values())
    return (out if is_root else {}), is_root


def _local_whole(st: Mapping[str, Any], sh: ShardRange | None, keys: tuple[str, ...]) -> dict[str, Any]:
    entry: dict[str, Any] = {"step": st["step"]}
    for k in (k for k in keys if k in st):
        local = st[k].detach().reshape(-1).to("cpu", torch.float32, copy=True)
        if sh is not None and (sh.start, sh.end) != (0, sh.numel):
            whole = torch.zeros(sh.numel, dtype=torch.float32)
            whole[sh.start : sh.end] = local
            local = whole
        entry[k] = local
    return entry


def _gather_one(
    comm: Communicator, local: torch.Tensor | None, parts: list[_Local], numel: int
) -> torch.Tensor | None:
    """Rank 0 of ``comm``: the whole flat tensor from every rank's ``[start, end)``; else None."""
    longest = max(x.end - x.start for x in parts)
    whole = torch.zeros(numel, dtype=torch.float32) if comm.rank == 0 else None
    for off in range(0, longest, _GATHER_CHUNK):
        c = min(_GATHER_CHUNK, longest - off)
        buf = torch.zeros(c, dtype=torch.float32, device=comm.device)
        if local is not None and off < local.numel():
            piece = local[off : off + c]
            buf[: piece.numel()].copy_(piece)
        gathered = torch.empty(c * comm.size, dtype=torch.float32, device=comm.device)
        comm.all_gather(buf, gathered)
        if whole is not None:
            host = gathered.cpu()
            for r, x in enumerate(parts):
                n = min(c, x.end - x.start - off)
                if n > 0:
                    whole[x.start + off : x.start + off + n] = host[r * c : r * c + n]
    return whole


def slice_whole(p: torch.Tensor, t: torch.Tensor, key: str, index: int) -> torch.Tensor:
    """This rank's part of the whole state tensor ``t`` of parameter ``p`` (flat)."""
    sh = shard_of(p)
    flat = t.detach().reshape(-1)
    whole = sh.numel if sh is not None else p.numel()
    if flat.numel() != whole:
        raise ValueError(
            f"whole state {key!r} of param {index} has {flat.numel()} elements; the whole parameter has {whole}"
        )
    return flat if sh is None else flat[sh.start : sh.end]
