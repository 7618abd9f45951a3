"""``NcclCommunicator``: the ``Communicator`` interface over bmt's runtime-loaded NCCL.

Every call is enqueued on the current CUDA stream of the communicator's device and returns at
once (as torch's NCCL collectives do): order it with ``torch.cuda.stream``/``wait_stream``.
"""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import Iterator, Sequence

import torch
from torch._C._distributed_c10d import Store

from ..communicator import Communicator, ReduceOp
from ..timeouts import CollectiveError
from ._binding import NcclLibrary
from ._handle import NCCLCommunicator, stream_of
from ._search import get_library
from ._types import NcclRedOp, nccl_dtype, nccl_op
from .watchdog import get_watchdog

_NCCL_IN_PROGRESS = 7  # ncclInProgress: a non-blocking call still running, not an error

__all__ = ["NcclCommunicator", "exchange_unique_id"]

def exchange_unique_id(
    store: Store, key: str, is_root: bool, lib: NcclLibrary | None = None
) -> bytes:
    """Group rank 0 makes an ``ncclUniqueId`` and publishes it under ``key``; the others wait for it.

    ``key`` must be new to ``store``: ``init_distributed`` names its keys with the process's init
    generation (:meth:`bmt_comm.context.ProcessState.next_generation`), so a re-init never reads
    the id of an earlier run.
    """
    if is_root:
        uid = (lib if lib is not None else get_library()).get_unique_id()
        store.set(key, uid)  # type: ignore[arg-type]  # the binding takes bytes (a std::string)
        return uid
    return bytes(store.get(key))


class NcclCommunicator(Communicator):
    """A group of ranks with one ``ncclComm_t``, on one GPU per rank.

    Build it with :meth:`from_store` (what ``init_distributed`` does) or :meth:`from_unique_id`.
    ``handle`` is the raw communicator, usable with the ``bmt.nccl`` low-level functions.
    """

    def __init__(
        self,
        handle: NCCLCommunicator,
        global_ranks: Sequence[int],
        rank: int,
        timeout: datetime.timedelta | None = None,
        label: str = "",
    ) -> None:
        ranks = tuple(int(r) for r in global_ranks)
        if not 0 <= rank < len(ranks):
            raise ValueError(f"rank ({rank}) must be in [0, {len(ranks)}) for group {list(ranks)}")
        self._handle = handle
        self._lib = handle.library
        self._ranks = ranks
        self._rank = rank
        self._device = handle.device
        self.timeout = timeout  # None: no watchdog (a communicator built by hand)
        self.label = label  # the group kinds it serves, for error messages
        self._failure: CollectiveError | None = None  # set by the watchdog; every later call raises it
        self._grouped: list[str] | None = None  # ops enqueued inside group(): watched once at its end

    @classmethod
    def from_unique_id(
        cls,
        unique_id: bytes,
        global_ranks: Sequence[int],
        rank_in_group: int,
        device: torch.device,
        lib: NcclLibrary | None = None,
        timeout: datetime.timedelta | None = None,
        label: str = "",
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
        comm = cls(handle, global_ranks, rank_in_group, timeout, label)
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
        timeout: datetime.timedelta | None = None,
        label: str = "",
    ) -> NcclCommunicator:
        """Share the unique id through a torch ``Store`` under ``key`` (new to the store, see
        :func:`exchange_unique_id`), then init on ``device``."""
        lib = lib if lib is not None else get_library()
        uid = exchange_unique_id(store, key, rank_in_group == 0, lib)
        return cls.from_unique_id(uid, global_ranks, rank_in_group, device, lib, timeout, label)

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
            if self.timeout is not None:
                get_watchdog().forget(self)
            self._handle.destroy()

    def abort(self) -> None:
        """``ncclCommAbort``: for error paths, where peers may never arrive."""
        if not self._handle.destroyed:
            if self.timeout is not None:
                get_watchdog().forget(self)
            self._handle.abort()

    # --- the watchdog's side (called from its thread) ----------------------------------
    @property
    def failure(self) -> CollectiveError | None:
        """The error that made the watchdog abort this communicator, if it did."""
        return self._failure

    def async_error(self) -> str | None:
        if self._handle.destroyed:
            return None
        code = self._lib.comm_get_async_error(self._handle.ptr)
        if code in (None, 0, _NCCL_IN_PROGRESS):
            return None
        detail = self._lib.last_error(self._handle.ptr)
        text = self._lib.error_string(code)
        return f"NCCL asynchronous error: {text}" + (f"; last error: {detail}" if detail else "")

    def abort_for(self, error: CollectiveError) -> None:
        self._failure = error
        try:
            self.abort()
        except Exception:  # already gone: the error stays recorded
            pass

    def _enter(self, op: str) -> None:
        """Before enqueueing: a communicator the watchdog aborted raises what it found."""
        if self._failure is not None:
            raise self._failure
        if self._grouped is not None:
            self._grouped.append(op)

    def _watch(self, op: str) -> None:
        """After enqueueing: an event on the stream, watched until it completes."""
        if self.timeout is None or self._grouped is not None:
            return
        event = torch.cuda.Event()  # type: ignore[no-untyped-call]
        event.record(torch.cuda.current_stream(self._device))
        get_watchdog().watch(op, self, event, self.timeout, self.label)

    # --- helpers -----------------------------------------------------------------------
    def _op(self, op: ReduceOp, dtype: torch.dtype) -> int:
        nop = nccl_op(op, dtype)
        if nop is NcclRedOp.AVG and self._lib.version < (2, 10, 0):
            version = ".".join(map(str, self._lib.version))
            raise RuntimeError(f"reduce op avg needs NCCL >= 2.10 (ncclAvg), but {self._lib.path} is {version}")
        return int(nop)

    # --- collectives -------------------------------------------------------------------
    def _all_gather(self, input: torch.Tensor, output: torch.Tensor) -> None:
        self._enter("all_gather")
        if input.numel() == 0:
            return
        self._lib.all_gather(
            input.data_ptr(), output.data_ptr(), input.numel(), nccl_dtype(input.dtype),
            self._handle.ptr, stream_of(self._device),
        )
        self._watch("all_gather")

    def _reduce_scatter(self, input: torch.Tensor, output: torch.Tensor, op: ReduceOp) -> None:
        self._enter("reduce_scatter")
        if output.numel() == 0:
            return
        self._lib.reduce_scatter(
            input.data_ptr(), output.data_ptr(), output.numel(), nccl_dtype(input.dtype),
            self._op(op, input.dtype), self._handle.ptr, stream_of(self._device),
        )
        self._watch("reduce_scatter")

    def _all_reduce(self, input: torch.Tensor, output: torch.Tensor, op: ReduceOp) -> None:
        self._enter("all_reduce")
        if input.numel() == 0:
            return
        self._lib.all_reduce(
            input.data_ptr(), output.data_ptr(), input.numel(), nccl_dtype(input.dtype),
            self._op(op, input.dtype), self._handle.ptr, stream_of(self._device),
        )
        self._watch("all_reduce")

    def _broadcast(self, input: torch.Tensor, output: torch.Tensor, root: int) -> None:
        self._enter("broadcast")
        if input.numel() == 0:
            return
        self._lib.broadcast(
            input.data_ptr(), output.data_ptr(), input.numel(), nccl_dtype(input.dtype),
            root, self._handle.ptr, stream_of(self._device),
        )
        self._watch("broadcast")

    def _reduce(self, input: torch.Tensor, output: torch.Tensor, op: ReduceOp, root: int) -> None:
        self._enter("reduce")
        if input.numel() == 0:
            return
        self._lib.reduce(
            input.data_ptr(), output.data_ptr(), input.numel(), nccl_dtype(input.dtype),
            self._op(op, input.dtype), root, self._handle.ptr, stream_of(self._device),
        )
        self._watch("reduce")

    def _send(self, tensor: torch.Tensor, peer: int) -> None:
        self._enter("send")
        if tensor.numel() == 0:
            return
        self._lib.send(
            tensor.data_ptr(), tensor.numel(), nccl_dtype(tensor.dtype), peer,
            self._handle.ptr, stream_of(self._device),
        )
        self._watch("send")

    def _recv(self, tensor: torch.Tensor, peer: int) -> None:
        self._enter("recv")
        if tensor.numel() == 0:
            return
        self._lib.recv(
            tensor.data_ptr(), tensor.numel(), nccl_dtype(tensor.dtype), peer,
            self._handle.ptr, stream_of(self._device),
        )
        self._watch("recv")

    @contextlib.contextmanager
    def _group(self) -> Iterator[None]:
        self._enter("group")
        outer = self._grouped is None
        if outer:
            self._grouped = []
        self._lib.group_start()
        try:
            yield
        except BaseException:
            try:  # close the group so NCCL's group depth stays balanced; report the first error
                self._lib.group_end()
            except RuntimeError:
                pass
            if outer:
                self._grouped = None
            raise
        self._lib.group_end()
        if outer:
            ops, self._grouped = self._grouped, None
            if ops:
                self._watch(f"group({', '.join(ops)})")
