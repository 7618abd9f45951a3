"""A raw ``ncclComm_t``: the reference's ``bmt.nccl.NCCLCommunicator``."""

from __future__ import annotations

import torch

from ._binding import NcclLibrary
from ._search import get_library

__all__ = ["NCCLCommunicator", "stream_of"]


def stream_of(device: torch.device) -> int:
    """The ``cudaStream_t`` of ``device``'s current stream: where every call is enqueued."""
    return int(torch.cuda.current_stream(device).cuda_stream)


class NCCLCommunicator:
    """Owns one ``ncclComm_t`` pointer; ``ptr`` raises once it was destroyed.

    ``device`` is the GPU the communicator was created on (the current device when omitted):
    work is enqueued on that device's current stream.
    """

    def __init__(
        self, ptr: int, device: torch.device | int | None = None, lib: NcclLibrary | None = None
    ) -> None:
        if not ptr:
            raise ValueError("NCCLCommunicator needs a non-null ncclComm_t pointer")
        self._ptr: int | None = int(ptr)
        if device is None:
            device = torch.cuda.current_device()
        self._device = torch.device("cuda", device) if isinstance(device, int) else device
        if self._device.type != "cuda" or self._device.index is None:
            raise ValueError(f"an NCCL communicator lives on one CUDA device (cuda:N), got {self._device}")
        self._lib = lib if lib is not None else get_library()

    @property
    def ptr(self) -> int:
        if self._ptr is None:
            raise RuntimeError("this NCCL communicator was destroyed")
        return self._ptr

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def library(self) -> NcclLibrary:
        return self._lib

    @property
    def destroyed(self) -> bool:
        return self._ptr is None

    def stream(self) -> int:
        return stream_of(self._device)

    def count(self) -> int:
        return self._lib.comm_count(self.ptr)

    def rank(self) -> int:
        return self._lib.comm_user_rank(self.ptr)

    def destroy(self) -> None:
        """``ncclCommDestroy``; a second call raises (the handle is gone)."""
        ptr = self.ptr
        self._ptr = None
        self._lib.comm_destroy(ptr)

    def abort(self) -> None:
        """``ncclCommAbort``: frees the communicator and aborts its unfinished work."""
        ptr = self.ptr
        self._ptr = None
        self._lib.comm_abort(ptr)

    def __repr__(self) -> str:
        state = "destroyed" if self._ptr is None else hex(self._ptr)
        return f"NCCLCommunicator({state}, device={self._device})"
