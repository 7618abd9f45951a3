"""Checksums of checkpoint bytes: CRC-32 (zlib, in the standard library; it releases the GIL).

CRC-32 finds every burst of flipped bits up to 32 bits long and misses a random corruption with
probability 2^-32: a guard against disks, copies and truncation, not against tampering.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Mapping
from typing import Any, BinaryIO

import torch

__all__ = ["ALGORITHM", "HashingWriter", "crc_of_file", "crc_of_tensor", "sealed", "unseal"]

ALGORITHM = "crc32"
CHUNK = 8 << 20  # bytes read at a time when checking a file: bounded memory, long reads


def crc_of_tensor(tensor: torch.Tensor) -> int:
    """CRC-32 of a CPU tensor's bytes, as they are written to a file (C order)."""
    flat = tensor.detach().reshape(-1)
    if flat.numel() == 0:
        return 0
    return zlib.crc32(flat.contiguous().view(torch.uint8).numpy().data)


def crc_of_file(path: str, start: int = 0, length: int | None = None) -> int:
    """CRC-32 of ``length`` bytes of ``path`` from ``start`` (to the end if None), read in chunks;
    an ``OSError`` if the file is shorter."""
    crc = 0
    with open(path, "rb", buffering=0) as f:
        f.seek(start)
        left = os.fstat(f.fileno()).st_size - start if length is None else length
        buf = bytearray(min(CHUNK, max(left, 0)))
        view = memoryview(buf)
        while left > 0:
            n = f.readinto(view[: min(CHUNK, left)])
            if not n:
                raise OSError(f"{path}: ended {left} bytes early")
            crc = zlib.crc32(view[:n], crc)
            left -= n
    return crc


class HashingWriter:
    """A write-only file object that passes bytes on to ``f``, counting them and their CRC-32;
    it keeps the ``OSError`` that ``f`` raised (torch's writer may report it as another error)."""

    def __init__(self, f: BinaryIO, hashing: bool = True) -> None:
        self._f = f
        self._hashing = hashing  # False: count only (the caller has the checksums it needs)
        self.size = 0
        self.crc = 0
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        try:
            n = self._f.write(view)
        except OSError as ex:
            self.error = ex
            raise
        n = len(view) if n is None else n
        if self._hashing:
            self.crc = zlib.crc32(view[:n], self.crc)
        self.size += n
        return n

    def flush(self) -> None:
        try:
            self._f.flush()
        except OSError as ex:
            self.error = ex
            raise

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def tell(self) -> int:
        return self.size


def sealed(document: Mapping[str, Any]) -> dict[str, Any]:
    """``document`` with a ``checksum`` field over its canonical JSON: a flipped byte in a metadata
    file that still parses is found too."""
    body = {k: v for k, v in document.items() if k != "checksum"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return {**body, "checksum": f"{ALGORITHM}:{zlib.crc32(canonical):08x}"}


def unseal(document: Mapping[str, Any], path: str) -> None:
    """Raise ``ValueError`` naming ``path`` if ``document``'s ``checksum`` does not match it."""
    recorded = document.get("checksum")
    if recorded is None:
        return
    found = sealed(document)["checksum"]
    if recorded != found:
        raise ValueError(f"{path} is corrupt: its checksum is {recorded!r} but its contents give {found!r}")
