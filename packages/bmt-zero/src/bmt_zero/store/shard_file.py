"""One rank's safetensors file, written here so that bytes are streamed (no second copy in
memory) through a file object whose errors are real ``OSError``s (a full disk is ``ENOSPC``),
with each tensor's CRC-32 in the header's ``__metadata__``. Any safetensors reader opens it.

Layout (safetensors): 8 bytes little-endian header length, the JSON header (names, dtypes,
shapes, ``data_offsets``; ``__metadata__``: strings), then the tensors' bytes, back to back.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .checksum import HashingWriter, crc_of_tensor

__all__ = ["CRC_KEY", "ShardHeader", "read_header", "write_shard"]

CRC_KEY = "bmt_zero.crc32"  # __metadata__ entry: JSON {tensor name: CRC-32 of its bytes}
MAX_HEADER = 100 << 20  # safetensors' own limit on the header's size

_CODES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64",
}


@dataclass(frozen=True)
class ShardHeader:
    """What a shard file's header says, and where its bytes are."""

    size: int  # the bytes the header announces: 8 + header + data
    header_crc: int  # CRC-32 of the first 8 + header-length bytes
    tensors: dict[str, dict[str, Any]]  # name -> dtype, shape, data_offsets (from the data start)
    metadata: dict[str, str]
    data_start: int


def write_shard(path: str, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
                writer: HashingWriter) -> ShardHeader:
    """Write contiguous CPU ``tensors`` as a safetensors file through ``writer`` (open on ``path``)."""
    entries: dict[str, Any] = {}
    offset = 0
    crcs: dict[str, int] = {}
    for name, t in tensors.items():
        if t.dtype not in _CODES:
            raise TypeError(f"{name}: dtype {t.dtype} can't be saved in a safetensors file")
        n = t.numel() * t.element_size()
        entries[name] = {"dtype": _CODES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        crcs[name] = crc_of_tensor(t)
        offset += n
    meta = {**metadata, CRC_KEY: json.dumps(crcs, separators=(",", ":"))}
    body = json.dumps({"__metadata__": meta, **entries}, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)  # the data starts 8-byte aligned, as safetensors' own writer does
    head = struct.pack("<Q", len(body)) + body
    writer.write(head)
    for t in tensors.values():
        if t.numel():
            writer.write(t.detach().reshape(-1).view(torch.uint8).numpy().data)
    return ShardHeader(len(head) + offset, zlib.crc32(head), entries, dict(meta), len(head))


def read_header(path: str) -> ShardHeader:
    """Parse ``path``'s header; ``ValueError`` naming the file if it is not a safetensors header."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"{path} is truncated: {len(raw)} bytes, shorter than a safetensors header")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER:
            raise ValueError(f"{path} is corrupt: its header claims {n} bytes (at most {MAX_HEADER})")
        body = f.read(n)
    if len(body) < n:
        raise ValueError(f"{path} is truncated: its header needs {8 + n} bytes, the file has {8 + len(body)}")
    try:
        header = json.loads(body)
    except ValueError as ex:
        raise ValueError(f"{path} is corrupt: its header is not valid JSON ({ex})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path} is corrupt: its header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    end = 0
    for name, info in header.items():
        try:
            end = max(end, int(info["data_offsets"][1]))
        except (TypeError, KeyError, IndexError, ValueError):
            raise ValueError(f"{path} is corrupt: tensor {name!r} has no valid data_offsets") from None
    return ShardHeader(8 + n + end, zlib.crc32(raw + body), header, metadata, 8 + n)


def file_size(path: str) -> int:
    return os.stat(path).st_size
