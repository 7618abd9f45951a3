"""``NcclCommunicator``: the ``Communicator`` interface over bmt's runtime-loaded NCCL.

Every call is enqueued on the current CUDA stream of the communicator's device and returns at
once (as torch's NCCL collectives do): order it with ``torch.cuda.stream``/``wait_stream``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch._C._distributed_c10d import Store

from ..communicator import Communicator, ReduceOp
from ._handle import NCCLCommunicator, stream_of
from ._library import NcclLibrary, get_library
from ._types import NcclRedOp, nccl_dtype, nccl_op

__all__ = ["NcclCommunicator", "exchange_unique_id"]

# how often this process used each store key: all ranks make the same calls in the same order,
# so "<key>/<n>" names the same fresh slot everywhere and a re-init never reads a stale id
_KEY_USES: dict[str, int] = {}


def exchange_unique_id(
    store: Store, key: str, is_root: bool, lib: NcclLibrary | None = None
) -> bytes:
    """Group rank 0 makes an ``ncclUniqueId`` and publishes it under ``key``; the others wait for it."""
    use = _KEY_USES.get(key, 0)
    _KEY_USES[key] = use + 1
    slot = f"{key}/{use}"
    if is_root:
        uid = (lib if lib is not None else get_library()).get_unique_id()
        store.set(slot, uid)  # type: ignore[arg-type]  # the binding takes bytes (a std::string)
        return uid
    return bytes(store.get(slot))


class NcclCommunicator(Communicator):
    """A group of ranks with one ``ncclComm_t``, on one GPU per rank.

    Build it with :meth:`from_store` (what ``init_distributed`` does) or :meth:`from_unique_id`.
    ``handle`` is the raw communicator, usable with the ``bmt.nccl`` low-level functions.
    """

    def __init__(self, handle: NCCLCommunicator, global_ranks: Sequence[int], rank: int) -> None:
        ranks = tuple(int(r) for r in global_ranks)
        if not 0 <= rank < len(ranks):
            raise ValueError(f"rank ({rank}) must be in [0, {len(ranks)}) for group {list(ranks)}")
        self._handle = handle
        self._lib = handle.library
        self._ranks = ranks
        self._rank = rank
        self._device = handle.device

    @classmethod
    def from_unique_id(
        cls,
        unique_id: bytes,
        global_ranks: Sequence[int],
        rank_in_group: int,
        device: torch.device,
        lib: NcclLibrary | None = None,
    ) -> NcclCommunicator:
        """``ncclCommInitRank`` on ``device``; blocks until every member has joined."""
        lib = lib if lib is not None else get_library()
        n = len(global_ranks)
        if not 0 <= rank_in_group < n:
            raise ValueError(f"rank_in_group ({rank_in_group}) must be in [0, {n}) for group {list(global_ranks)}")
        if device.type != "cuda":
            raise ValueError(f"an NCCL communicator needs a CUDA device, got {device}")
        index = device.index if device.index is not None else torch.cuda.current_device()
        device = torch.device("cuda", index)
        with torch.cuda.device(device):
            ptr = lib.comm_init_rank(n, unique_id, rank_in_group)
        handle = NCCLCommunicator(ptr, device, lib)
        comm = cls(handle, global_ranks, rank_in_group)
        if handle.count() != n or handle.rank() != rank_in_group:
            raise RuntimeError(
                f"NCCL reports rank {handle.rank()} of {handle.count()}, expected {rank_in_group} of {n}"
            )
        return comm

    @classmethod
    def from_store(
        cls,
        store: Store,
        key: str,
        global_ranks: Sequence[int],
        rank_in_group: int,
        device: torch.device,
        lib: NcclLibrary | None = None,
    ) -> NcclCommunicator:
        """Share the unique id through a torch ``Store`` under ``key``, then init on ``device``."""
        lib = lib if lib is not None else get_library()
        uid = exchange_unique_id(store, key, rank_in_group == 0, lib)
        return cls.from_unique_id(uid, global_ranks, rank_in_group, device, lib)

    # --- identity ----------------------------------------------------------------------
    @property
    def handle(self) -> NCCLCommunicator:
        return self._handle

    @property
    def closed(self) -> bool:
        return self._handle.destroyed

    def close(self) -> None:
        """``ncclCommDestroy``; later calls do nothing."""
        if not self._handle.destroyed:
            self._handle.destroy()

    def abort(self) -> None:
        """``ncclCommAbort``: for error paths, where peers may never arrive."""
        if not self._handle.destroyed:
            self._handle.abort()

    # --- helpers -----------------------------------------------------------------------
    def _op(self, op: ReduceOp, dtype: torch.dtype) -> int:
        nop = nccl_op(op, dtype)
        if nop is NcclRedOp.AVG and self._lib.version < (2, 10, 0):
            version = ".".join(map(str, self._lib.version))
            raise RuntimeError(f"reduce op avg needs NCCL >= 2.10 (ncclAvg), but {self._lib.path} is {version}")
        return int(nop)

    # --- collectives -------------------------------------------------------------------
    def _all_gather(self, input: torch.Tensor, output: torch.Tensor) -> None:
        if input.numel() == 0:
            return
        self._lib.all_gather(
            input.data_ptr(), output.data_ptr(), input.numel(), nccl_dtype(input.dtype),
            self._handle.ptr, stream_of(self._device),
        )

    def _reduce_scatter(self, input: torch.Tensor, output: torch.Tensor, op: ReduceOp) -> None:
        if output.numel() == 0:
            return
        self._lib.reduce_scatter(
            input.data_ptr(), output.data_ptr(), output.numel(), nccl_dtype(input.dtype),
            self._op(op, input.dtype), self._handle.ptr, stream_of(self._device),
        )

    def _all_reduce(self, input: torch.Tensor, output: torch.Tensor, op: ReduceOp) -> None:
        if input.numel() == 0:
            return
        self._lib.all_reduce(
            input.data_ptr(), output.data_ptr(), input.numel(), nccl_dtype(input.dtype),
            self._op(op, input.dtype), self._handle.ptr, stream_of(self._device),
        )

    def _broadcast(self, input: torch.Tensor, output: torch.Tensor, root: int) -> None:
        if input.numel() == 0:
            return
        self._lib.broadcast(
            input.data_ptr(), output.data_ptr(), input.numel(), nccl_dtype(input.dtype),
            root, self._handle.ptr, stream_of(self._device),
        )

    def _reduce(self, input: torch.Tensor, output: torch.Tensor, op: ReduceOp, root: int) -> None:
        if input.numel() == 0:
            return
        self._lib.reduce(
            input.data_ptr(), output.data_ptr(), input.numel(), nccl_dtype(input.dtype),
            self._op(op, input.dtype), root, self._handle.ptr, stream_of(self._device),
        )

    def _send(self, tensor: torch.Tensor, peer: int) -> None:
        if tensor.numel() == 0:
            return
        self._lib.send(
            tensor.data_ptr(), tensor.numel(), nccl_dtype(tensor.dtype), peer,
            self._handle.ptr, stream_of(self._device),
        )

    def _recv(self, tensor: torch.Tensor, peer: int) -> None:
        if tensor.numel() == 0:
            return
        self._lib.recv(
            tensor.data_ptr(), tensor.numel(), nccl_dtype(tensor.dtype), peer,
            self._handle.ptr, stream_of(self._device),
        )

    @contextlib.contextmanager
    def _group(self) -> Iterator[None]:
        self._lib.group_start()
        try:
            yield
        except BaseException:
            try:  # close the group so NCCL's group depth stays balanced; report the first error
                self._lib.group_end()
            except RuntimeError:
                pass
            raise
        self._lib.group_end()
