"""One page-locked host allocation cut into per-parameter views.

``torch.empty(..., pin_memory=True)`` goes through torch's caching host allocator, which rounds
each block up to a power of two: host copies of a 6.74B model's gradients (13.5 GB of bf16)
would lock up to twice that. Here one ordinary allocation of the exact size is registered with
the CUDA driver (``cudaHostRegister``, as torch does for shared memory), so copies from and to it
are asynchronous, and only what is used is locked. Without CUDA it is ordinary memory; where the
driver refuses to lock that much (``ulimit -l``), it stays ordinary memory with a
``PinnedMemoryWarning`` (correct, but each copy then blocks).
"""

from __future__ import annotations

import warnings

import torch

__all__ = ["HostArena", "PinnedMemoryWarning"]


class PinnedMemoryWarning(RuntimeWarning):
    """Host memory could not be page-locked: copies to and from it are synchronous (slower)."""

_ALIGN = 64  # bytes: every view starts on a cache line


class HostArena:
    def __init__(self, sizes: list[tuple[int, torch.dtype]], pin: bool) -> None:
        """``sizes``: (numel, dtype) of each view, in order."""
        self.offsets: list[int] = []
        total = 0
        for numel, dtype in sizes:
            self.offsets.append(total)
            nbytes = numel * torch.empty((), dtype=dtype).element_size()
            total += (nbytes + _ALIGN - 1) // _ALIGN * _ALIGN
        self._sizes = sizes
        self.nbytes = total
        self._buf = torch.empty(max(total, 1), dtype=torch.uint8)
        self._pinned = False
        if pin and total:
            err = int(torch.cuda.cudart().cudaHostRegister(self._buf.data_ptr(), total, 0))  # type: ignore[no-untyped-call]
            if err != 0:
                # the first backward would fail here, mid-step: train on with pageable memory instead
                warnings.warn(
                    f"page-locking {total / 2**30:.2f} GiB of host memory for the offload optimizer's gradient "
                    f"copies failed (cudaHostRegister: CUDA error {err}; the limit is `ulimit -l`): they use "
                    "pageable memory, so each copy blocks the CPU and the overlap is lost",
                    PinnedMemoryWarning,
                    stacklevel=2,
                )
            else:
                self._pinned = True

    def view(self, index: int) -> torch.Tensor:
        numel, dtype = self._sizes[index]
        start = self.offsets[index]
        size = torch.empty((), dtype=dtype).element_size()
        return self._buf[start : start + numel * size].view(dtype)

    def close(self) -> None:
        if self._pinned:
            self._pinned = False
            try:
                torch.cuda.cudart().cudaHostUnregister(self._buf.data_ptr())  # type: ignore[no-untyped-call]
            except Exception:  # noqa: BLE001 - at interpreter exit the CUDA runtime may be gone already
                pass

    def __del__(self) -> None:
        self.close()
