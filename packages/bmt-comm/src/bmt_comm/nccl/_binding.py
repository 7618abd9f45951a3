"""The ctypes binding of the few libnccl functions bmt needs (the search is in ``_search``).

No NCCL headers and no compiler are needed: the library torch already uses is opened and the
functions are declared here (as vLLM's ``pynccl_wrapper`` does).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any

__all__ = ["NcclError", "NcclLibrary", "NcclUniqueId", "UNIQUE_ID_BYTES"]

UNIQUE_ID_BYTES = 128  # NCCL_UNIQUE_ID_BYTES


class NcclError(RuntimeError):
    """A non-success ``ncclResult_t``; the message carries NCCL's own error string."""

    def __init__(self, function: str, code: int, message: str) -> None:
        super().__init__(f"NCCL error in {function}: {message}")
        self.function = function
        self.code = code
        self.message = message

    def __reduce__(self) -> tuple[type[NcclError], tuple[str, int, str]]:  # picklable across processes
        return type(self), (self.function, self.code, self.message)


class NcclUniqueId(ctypes.Structure):
    _fields_ = [("internal", ctypes.c_byte * UNIQUE_ID_BYTES)]


_result = ctypes.c_int  # ncclResult_t
_comm = ctypes.c_void_p  # ncclComm_t
_stream = ctypes.c_void_p  # cudaStream_t
_buf = ctypes.c_void_p
_int = ctypes.c_int  # also ncclDataType_t, ncclRedOp_t
_size = ctypes.c_size_t


@dataclass(frozen=True)
class _Signature:
    name: str
    restype: Any
    argtypes: tuple[Any, ...]
    optional: bool = False  # absent from older NCCL releases


_SIGNATURES = (
    _Signature("ncclGetVersion", _result, (ctypes.POINTER(_int),)),
    _Signature("ncclGetErrorString", ctypes.c_char_p, (_result,)),
    _Signature("ncclGetLastError", ctypes.c_char_p, (_comm,), optional=True),  # NCCL >= 2.13
    _Signature("ncclGetUniqueId", _result, (ctypes.POINTER(NcclUniqueId),)),
    _Signature("ncclCommInitRank", _result, (ctypes.POINTER(_comm), _int, NcclUniqueId, _int)),
    _Signature("ncclCommDestroy", _result, (_comm,)),
    _Signature("ncclCommAbort", _result, (_comm,)),
    _Signature("ncclCommCount", _result, (_comm, ctypes.POINTER(_int))),
    _Signature("ncclCommUserRank", _result, (_comm, ctypes.POINTER(_int))),
    # the watchdog's probe of a communicator whose work has not finished (NCCL >= 2.4)
    _Signature("ncclCommGetAsyncError", _result, (_comm, ctypes.POINTER(_result)), optional=True),
    _Signature("ncclAllGather", _result, (_buf, _buf, _size, _int, _comm, _stream)),
    _Signature("ncclReduceScatter", _result, (_buf, _buf, _size, _int, _int, _comm, _stream)),
    _Signature("ncclAllReduce", _result, (_buf, _buf, _size, _int, _int, _comm, _stream)),
    _Signature("ncclBroadcast", _result, (_buf, _buf, _size, _int, _int, _comm, _stream)),
    _Signature("ncclReduce", _result, (_buf, _buf, _size, _int, _int, _int, _comm, _stream)),
    _Signature("ncclSend", _result, (_buf, _size, _int, _int, _comm, _stream)),
    _Signature("ncclRecv", _result, (_buf, _size, _int, _int, _comm, _stream)),
    _Signature("ncclGroupStart", _result, ()),
    _Signature("ncclGroupEnd", _result, ()),
)


class NcclLibrary:
    """libnccl opened from ``path``, with typed wrappers that raise :class:`NcclError`.

    Pointers, communicators and streams are plain ints (``data_ptr()``, ``cuda_stream``).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._lib = ctypes.CDLL(path)  # CDLL releases the GIL during calls (blocking inits)
        self._fns: dict[str, Any] = {}
        for sig in _SIGNATURES:
            try:
                fn = getattr(self._lib, sig.name)
            except AttributeError:
                if sig.optional:
                    continue
                raise RuntimeError(
                    f"{path} has no symbol {sig.name}: it is not an NCCL 2.x library"
                ) from None
            fn.restype = sig.restype
            fn.argtypes = list(sig.argtypes)
            self._fns[sig.name] = fn
        self.version_code = self._version_code()

    # --- errors ------------------------------------------------------------------------
    def error_string(self, code: int) -> str:
        raw: bytes | None = self._fns["ncclGetErrorString"](code)
        return raw.decode(errors="replace") if raw else f"unknown NCCL result {code}"

    def last_error(self, comm: int | None = None) -> str:
        fn = self._fns.get("ncclGetLastError")
        if fn is None:
            return ""
        raw: bytes | None = fn(comm)
        return raw.decode(errors="replace").strip() if raw else ""

    def check(self, function: str, code: int, comm: int | None = None) -> None:
        if code == 0:
            return
        message = self.error_string(code)
        detail = self.last_error(comm)
        if detail and detail not in message:
            message = f"{message}; last error: {detail}"
        raise NcclError(function, code, message)

    def _call(self, name: str, *args: Any, comm: int | None = None) -> None:
        self.check(name, int(self._fns[name](*args)), comm)

    # --- library and communicators -----------------------------------------------------
    def _version_code(self) -> int:
        v = _int()
        self._call("ncclGetVersion", ctypes.byref(v))
        return int(v.value)

    @property
    def version(self) -> tuple[int, int, int]:
        """(major, minor, patch); NCCL >= 2.9 encodes x*10000 + y*100 + z, older x*1000 + y*100 + z."""
        code = self.version_code
        if code >= 10000:
            return code // 10000, code // 100 % 100, code % 100
        return code // 1000, code // 100 % 10, code % 100

    def get_unique_id(self) -> bytes:
        uid = NcclUniqueId()
        self._call("ncclGetUniqueId", ctypes.byref(uid))
        return bytes(uid.internal)

    def comm_init_rank(self, nranks: int, unique_id: bytes, rank: int) -> int:
        """Blocks until all ``nranks`` ranks have joined; uses the current CUDA device."""
        if len(unique_id) != UNIQUE_ID_BYTES:
            raise ValueError(f"an NCCL unique id has {UNIQUE_ID_BYTES} bytes, got {len(unique_id)}")
        uid = NcclUniqueId()
        ctypes.memmove(uid.internal, unique_id, UNIQUE_ID_BYTES)
        comm = _comm()
        self._call("ncclCommInitRank", ctypes.byref(comm), nranks, uid, rank)
        if not comm.value:
            raise RuntimeError("ncclCommInitRank succeeded but returned a null communicator")
        return int(comm.value)

    def comm_destroy(self, comm: int) -> None:
        self._call("ncclCommDestroy", comm, comm=comm)

    def comm_abort(self, comm: int) -> None:
        self._call("ncclCommAbort", comm, comm=comm)

    def comm_count(self, comm: int) -> int:
        n = _int()
        self._call("ncclCommCount", comm, ctypes.byref(n), comm=comm)
        return int(n.value)

    def comm_user_rank(self, comm: int) -> int:
        r = _int()
        self._call("ncclCommUserRank", comm, ctypes.byref(r), comm=comm)
        return int(r.value)

    def comm_get_async_error(self, comm: int) -> int | None:
        """The communicator's asynchronous ``ncclResult_t`` (0: none; 7: still in progress);
        None when this NCCL has no ``ncclCommGetAsyncError``."""
        fn = self._fns.get("ncclCommGetAsyncError")
        if fn is None:
            return None
        result = _result()
        self.check("ncclCommGetAsyncError", int(fn(comm, ctypes.byref(result))), comm)
        return int(result.value)

    # --- collectives (enqueued on ``stream``) -------------------------------------------
    def all_gather(self, send: int, recv: int, count: int, dtype: int, comm: int, stream: int) -> None:
        self._call("ncclAllGather", send, recv, count, dtype, comm, stream, comm=comm)

    def reduce_scatter(
        self, send: int, recv: int, recv_count: int, dtype: int, op: int, comm: int, stream: int
    ) -> None:
        self._call("ncclReduceScatter", send, recv, recv_count, dtype, op, comm, stream, comm=comm)

    def all_reduce(
        self, send: int, recv: int, count: int, dtype: int, op: int, comm: int, stream: int
    ) -> None:
        self._call("ncclAllReduce", send, recv, count, dtype, op, comm, stream, comm=comm)

    def broadcast(
        self, send: int, recv: int, count: int, dtype: int, root: int, comm: int, stream: int
    ) -> None:
        self._call("ncclBroadcast", send, recv, count, dtype, root, comm, stream, comm=comm)

    def reduce(
        self, send: int, recv: int, count: int, dtype: int, op: int, root: int, comm: int, stream: int
    ) -> None:
        self._call("ncclReduce", send, recv, count, dtype, op, root, comm, stream, comm=comm)

    def send(self, buf: int, count: int, dtype: int, peer: int, comm: int, stream: int) -> None:
        self._call("ncclSend", buf, count, dtype, peer, comm, stream, comm=comm)

    def recv(self, buf: int, count: int, dtype: int, peer: int, comm: int, stream: int) -> None:
        self._call("ncclRecv", buf, count, dtype, peer, comm, stream, comm=comm)

    def group_start(self) -> None:
        self._call("ncclGroupStart")

    def group_end(self) -> None:
        self._call("ncclGroupEnd")

    def __repr__(self) -> str:
        return f"NcclLibrary({self.path!r}, version={'.'.join(map(str, self.version))})"
