"""The reference's low-level ``bmtrain.nccl`` functions.

Buffers may be storages (``tensor.untyped_storage()``, ``tensor.storage()``), used whole as in
BMTrain 1.0.1 (an untyped storage counts as uint8 bytes), or contiguous tensors. ``comm`` is
either a raw :class:`NCCLCommunicator` (``commInitRank``), whose calls go straight to NCCL on the
current stream, or any bmt :class:`~bmt_comm.communicator.Communicator` such as
``bmt.config["comm"]``, whose own methods run the call (so this module also works on CPU/gloo).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TypeAlias

import torch

from ..communicator import Communicator, ReduceOp
from ..context import NcclGroupState, process_state
from ._handle import NCCLCommunicator
from ._search import get_library, nccl_available
from ._types import nccl_dtype, nccl_op

# the reference's ``bmtrain.nccl`` functions; its constants are ``bmt_comm.nccl.enums.__all__``
__all__ = [
    "NCCLCommunicator",
    "getUniqueId",
    "commInitRank",
    "commDestroy",
    "commCount",
    "commRank",
    "allReduce",
    "allGather",
    "reduceScatter",
    "broadcast",
    "reduce",
    "send",
    "recv",
    "groupStart",
    "groupEnd",
    "dtype2nccl",
    "op2nccl",
]

Buffer: TypeAlias = torch.Tensor | torch.UntypedStorage | torch.TypedStorage
Comm: TypeAlias = NCCLCommunicator | Communicator


def dtype2nccl(dtype: torch.dtype) -> int:
    """``ncclDataType_t`` of a torch dtype (bool travels as uint8); TypeError for others."""
    return int(nccl_dtype(dtype))


def op2nccl(op: ReduceOp | str) -> int:
    """NCCL's number for a reduction named as 1.0.1 names them (``"sum"`` -> ``ncclSum``)."""
    names = [o.value for o in ReduceOp]
    if op not in names:
        raise ValueError(f"op must be one of {names}, got {op!r}")
    return int(nccl_op(op, torch.float32))


# --- buffers -----------------------------------------------------------------------------
@dataclass(frozen=True)
class _Buf:
    name: str
    ptr: int
    count: int  # elements
    dtype: torch.dtype
    device: torch.device
    source: Buffer

    def tensor(self) -> torch.Tensor:
        """A flat view of the whole buffer, for Communicator methods (not needed on the raw path)."""
        b = self.source
        if isinstance(b, torch.Tensor):
            return b.view(-1)
        return torch.empty(0, dtype=self.dtype, device=self.device).set_(b)  # type: ignore[arg-type]


def _buffer(name: str, b: Buffer) -> _Buf:
    if isinstance(b, torch.Tensor):
        if not b.is_contiguous():
            raise ValueError(f"{name} must be contiguous (shape {tuple(b.shape)}, stride {b.stride()})")
        return _Buf(name, b.data_ptr(), b.numel(), b.dtype, b.device, b)
    if isinstance(b, torch.TypedStorage):
        ptr, count = b.data_ptr(), b.size()  # type: ignore[no-untyped-call]  # deprecated class, untyped
        return _Buf(name, int(ptr), int(count), b.dtype, b.device, b)
    if isinstance(b, torch.UntypedStorage):
        return _Buf(name, b.data_ptr(), b.nbytes(), torch.uint8, b.device, b)
    raise TypeError(f"{name} must be a tensor or a storage, got {type(b).__name__}")


def _pair(src: Buffer, dst: Buffer) -> tuple[_Buf, _Buf]:
    s, d = _buffer("src", src), _buffer("dst", dst)
    if s.dtype != d.dtype:
        raise TypeError(f"src dtype ({s.dtype}) must equal dst dtype ({d.dtype})")
    return s, d


def _generic(comm: Comm) -> Communicator | None:
    """``comm`` when it is a bmt Communicator (joined to an open group), else None."""
    if isinstance(comm, Communicator):
        _join_open_group(comm)
        return comm
    return None


def _raw(comm: Comm, *bufs: _Buf) -> NCCLCommunicator:
    """The raw communicator, after checking the buffers sit on its GPU."""
    if not isinstance(comm, NCCLCommunicator):
        raise TypeError(
            "comm must be an NCCLCommunicator (bmt.nccl.commInitRank) or a bmt Communicator "
            f"(bmt.config['comm']), got {type(comm).__name__}"
        )
    for b in bufs:
        if b.device != comm.device:
            raise ValueError(f"{b.name} is on {b.device} but the NCCL communicator works on {comm.device}")
    return comm


def _same_count(s: _Buf, d: _Buf) -> None:
    if s.count != d.count:
        raise ValueError(f"src size ({s.count}) must equal dst size ({d.count})")


# --- communicators -----------------------------------------------------------------------
def getUniqueId() -> bytes:
    """A fresh ``ncclUniqueId`` (128 bytes) to share with every rank before ``commInitRank``."""
    return get_library().get_unique_id()


def commInitRank(unique_id: bytes, world_size: int, rank: int) -> NCCLCommunicator:
    """``ncclCommInitRank`` on the current CUDA device; blocks until all ranks joined."""
    lib = get_library()
    ptr = lib.comm_init_rank(world_size, unique_id, rank)
    return NCCLCommunicator(ptr, torch.cuda.current_device(), lib)


def commDestroy(comm: Comm) -> None:
    """Destroy a raw communicator (a second call raises), or close a bmt Communicator."""
    if isinstance(comm, Communicator):
        close = getattr(comm, "close", None)
        if close is not None:
            close()
        return
    _raw(comm).destroy()


def commCount(comm: Comm) -> int:
    return comm.size if isinstance(comm, Communicator) else _raw(comm).count()


def commRank(comm: Comm) -> int:
    return comm.rank if isinstance(comm, Communicator) else _raw(comm).rank()


# --- collectives -------------------------------------------------------------------------
def allReduce(src: Buffer, dst: Buffer, op: ReduceOp | str, comm: Comm) -> None:
    """Reduce ``src`` over ranks into ``dst`` (``src is dst``: in place)."""
    s, d = _pair(src, dst)
    _same_count(s, d)
    generic = _generic(comm)
    if generic is not None:
        generic.all_reduce(s.tensor(), op, output=d.tensor())
        return
    raw = _raw(comm, s, d)
    raw.library.all_reduce(
        s.ptr, d.ptr, s.count, dtype2nccl(s.dtype), int(nccl_op(op, s.dtype)), raw.ptr, raw.stream()
    )


def allGather(src: Buffer, dst: Buffer, comm: Comm) -> None:
    """Rank ``r``'s ``src`` lands in ``dst`` at offset ``r * src size``."""
    s, d = _pair(src, dst)
    n = commCount(comm)
    if d.count % max(s.count, 1) != 0 or d.count < n * s.count:
        raise ValueError(f"dst size ({d.count}) must be a multiple of src size ({s.count}), at least {n}x it")
    generic = _generic(comm)
    if generic is not None:
        generic.all_gather(s.tensor(), d.tensor()[: n * s.count])
        return
    raw = _raw(comm, s, d)
    raw.library.all_gather(s.ptr, d.ptr, s.count, dtype2nccl(s.dtype), raw.ptr, raw.stream())


def reduceScatter(src: Buffer, dst: Buffer, op: ReduceOp | str, comm: Comm) -> None:
    """Reduce ``src`` over ranks; rank ``r`` gets block ``r`` (of ``dst``'s size) in ``dst``."""
    s, d = _pair(src, dst)
    n = commCount(comm)
    if s.count % max(d.count, 1) != 0 or s.count < n * d.count:
        raise ValueError(f"src size ({s.count}) must be a multiple of dst size ({d.count}), at least {n}x it")
    generic = _generic(comm)
    if generic is not None:
        generic.reduce_scatter(s.tensor()[: n * d.count], d.tensor(), op)
        return
    raw = _raw(comm, s, d)
    raw.library.reduce_scatter(
        s.ptr, d.ptr, d.count, dtype2nccl(s.dtype), int(nccl_op(op, s.dtype)), raw.ptr, raw.stream()
    )


def broadcast(src: Buffer, dst: Buffer, root: int, comm: Comm) -> None:
    """``root``'s ``src`` lands in every rank's ``dst``."""
    s, d = _pair(src, dst)
    _same_count(s, d)
    generic = _generic(comm)
    if generic is not None:
        generic.broadcast(s.tensor(), root, output=d.tensor())
        return
    raw = _raw(comm, s, d)
    raw.library.broadcast(s.ptr, d.ptr, s.count, dtype2nccl(s.dtype), root, raw.ptr, raw.stream())


def reduce(src: Buffer, dst: Buffer, op: ReduceOp | str, root: int, comm: Comm) -> None:
    """Reduce over ranks into ``root``'s ``dst`` (other ranks' ``dst`` is left alone)."""
    s, d = _pair(src, dst)
    _same_count(s, d)
    generic = _generic(comm)
    if generic is not None:
        generic.reduce(s.tensor(), root, op, output=d.tensor())
        return
    raw = _raw(comm, s, d)
    raw.library.reduce(
        s.ptr, d.ptr, s.count, dtype2nccl(s.dtype), int(nccl_op(op, s.dtype)), root, raw.ptr, raw.stream()
    )


def send(src: Buffer, peer: int, comm: Comm) -> None:
    s = _buffer("src", src)
    generic = _generic(comm)
    if generic is not None:
        generic.send(s.tensor(), peer)
        return
    raw = _raw(comm, s)
    raw.library.send(s.ptr, s.count, dtype2nccl(s.dtype), peer, raw.ptr, raw.stream())


def recv(dst: Buffer, peer: int, comm: Comm) -> None:
    d = _buffer("dst", dst)
    generic = _generic(comm)
    if generic is not None:
        generic.recv(d.tensor(), peer)
        return
    raw = _raw(comm, d)
    raw.library.recv(d.ptr, d.count, dtype2nccl(d.dtype), peer, raw.ptr, raw.stream())


# --- groups ------------------------------------------------------------------------------
def _nccl_groups() -> bool:
    return torch.cuda.is_available() and nccl_available()


def _groups() -> NcclGroupState:
    """This thread's open-group state (NCCL groups are per thread), kept in the process state."""
    return process_state().nccl_groups


def _join_open_group(comm: Communicator) -> None:
    """Inside groupStart/groupEnd, a Communicator's calls join its own group() (sends and
    receives of the torch transport are then posted together, as NCCL's are)."""
    state = _groups()
    if state.stack is not None and id(comm) not in state.joined:
        state.joined.add(id(comm))
        state.stack.enter_context(comm.group())


def groupStart() -> None:
    state = _groups()
    if _nccl_groups():
        get_library().group_start()
    if state.depth == 0:
        state.stack = contextlib.ExitStack()
        state.joined = set()
    state.depth += 1


def groupEnd() -> None:
    state = _groups()
    if state.depth == 0:
        raise RuntimeError("groupEnd() called without a matching groupStart()")
    state.depth -= 1
    stack = state.stack if state.depth == 0 else None
    if stack is not None:
        state.stack = None
        state.joined = set()
    try:
        if stack is not None:
            stack.close()
    finally:
        if _nccl_groups():
            get_library().group_end()
