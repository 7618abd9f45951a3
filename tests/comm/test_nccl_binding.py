"""CPU tests of bmt's NCCL binding: type/op maps, library search, the communicator's calls into
NCCL (through a recording fake library), the low-level ``bmt.nccl`` functions on gloo, and, where
the ``nvidia-nccl`` wheel is installed, the real library's version, error strings and unique ids.
"""

from __future__ import annotations

import ctypes.util
import os
import pickle
from typing import Any

import bmt_comm
import pytest
import torch
from bmt_comm.communicator import ReduceOp
from bmt_comm.context import process_state
from bmt_comm.nccl import _search, api
from bmt_comm.nccl import communicator as nccl_comm_mod
from bmt_comm.nccl._binding import NcclError, NcclLibrary
from bmt_comm.nccl._handle import NCCLCommunicator
from bmt_comm.nccl._search import ENV_VAR, LibrarySource
from bmt_comm.nccl._types import NcclDataType, NcclRedOp, nccl_dtype, nccl_op
from bmt_comm.nccl.communicator import NcclCommunicator, exchange_unique_id

# --- dtype / op maps ---------------------------------------------------------------------------

_EXPECTED_DTYPES = {
    torch.int8: 0, torch.uint8: 1, torch.int32: 2, torch.int64: 4, torch.float16: 6,
    torch.float32: 7, torch.float64: 8, torch.bfloat16: 9, torch.bool: 1,
}


def test_dtype_map_matches_nccl_h() -> None:
    for dtype, code in _EXPECTED_DTYPES.items():
        assert api.dtype2nccl(dtype) == code, dtype
        assert nccl_dtype(dtype) == code
    for bad in (torch.int16, torch.complex64, torch.float8_e4m3fn):
        with pytest.raises(TypeError, match=str(bad).replace(".", r"\.")):
            api.dtype2nccl(bad)


def test_op_map_and_bool_reductions() -> None:
    for op, code in [("sum", 0), ("prod", 1), ("max", 2), ("min", 3), ("avg", 4)]:
        assert nccl_op(op, torch.float32) == code
        assert nccl_op(ReduceOp(op), torch.int64) == code
    # bool: or for sum/max/avg, and for min/prod (the torch transport's rule)
    assert [nccl_op(op, torch.bool) for op in ("sum", "max", "avg", "min", "prod")] == [
        NcclRedOp.MAX, NcclRedOp.MAX, NcclRedOp.MAX, NcclRedOp.MIN, NcclRedOp.MIN,
    ]
    with pytest.raises(ValueError, match="'mean'"):
        nccl_op("mean", torch.float32)


def test_reference_constants() -> None:
    import bmt_comm.nccl as nccl

    expected = {
        "ncclInt8": 0, "ncclChar": 0, "ncclBool": 0, "ncclUint8": 1, "ncclInt32": 2, "ncclUint32": 3,
        "ncclInt64": 4, "ncclUint64": 5, "ncclFloat16": 6, "ncclFloat32": 7, "ncclFloat64": 8,
        "ncclBFloat16": 9, "ncclSum": 0, "ncclProd": 1, "ncclMax": 2, "ncclMin": 3, "ncclAvg": 4,
    }
    assert {k: getattr(nccl, k) for k in expected} == expected
    for name in ("NCCLCommunicator", "getUniqueId", "commInitRank", "commDestroy", "commCount", "commRank",
                 "allReduce", "allGather", "reduceScatter", "broadcast", "reduce", "send", "recv",
                 "groupStart", "groupEnd", "dtype2nccl", "NcclCommunicator", "nccl_available"):
        assert callable(getattr(nccl, name)), name


# --- library search ----------------------------------------------------------------------------

@pytest.fixture
def fake_search(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """Replace every search location; tests fill the lists. The cached library is dropped."""
    found: dict[str, list[str]] = {"loaded": [], "pip": [], "torch": [], "system": []}
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setattr(_search, "_loaded_paths", lambda: found["loaded"])
    monkeypatch.setattr(_search, "_pip_paths", lambda: found["pip"])
    monkeypatch.setattr(_search, "_torch_paths", lambda: found["torch"])
    monkeypatch.setattr(_search, "_system_paths", lambda: found["system"])
    monkeypatch.setattr(process_state(), "nccl_library", None)
    yield found


def test_search_order(fake_search: dict[str, list[str]]) -> None:
    fake_search.update(
        loaded=["/proc/lib/libnccl.so.2"], pip=["/pip/libnccl.so.2", "/proc/lib/libnccl.so.2"],
        torch=["/torch/lib/libnccl.so.2"], system=["libnccl.so.2"],
    )
    cands = _search.library_candidates()
    assert [(c.source, c.path) for c in cands] == [
        (LibrarySource.LOADED, "/proc/lib/libnccl.so.2"),  # the duplicate under pip is dropped
        (LibrarySource.PIP, "/pip/libnccl.so.2"),
        (LibrarySource.TORCH, "/torch/lib/libnccl.so.2"),
        (LibrarySource.SYSTEM, "libnccl.so.2"),
    ]


def test_env_var_overrides_everything(fake_search: dict[str, list[str]], monkeypatch: pytest.MonkeyPatch,
                                      tmp_path: Any) -> None:
    fake_search.update(pip=["/pip/libnccl.so.2"])
    missing = str(tmp_path / "nope" / "libnccl.so.2")
    monkeypatch.setenv(ENV_VAR, missing)
    assert [(c.source, c.path) for c in _search.library_candidates()] == [(LibrarySource.ENV, missing)]
    with pytest.raises(RuntimeError, match=f"{ENV_VAR} names a library.*{missing}.*no such file"):
        _search.load_library()


def test_no_library_is_a_clear_error(fake_search: dict[str, list[str]]) -> None:
    with pytest.raises(RuntimeError, match=f"could not load libnccl.*no candidate found.*{ENV_VAR}"):
        _search.load_library()
    assert _search.nccl_available() is False
    with pytest.raises(RuntimeError, match="could not load libnccl"):
        api.getUniqueId()


def test_a_library_that_is_not_nccl_is_skipped_with_its_reason(fake_search: dict[str, list[str]]) -> None:
    libc = ctypes.util.find_library("c")
    if libc is None:
        pytest.skip("no libc found by ctypes.util.find_library to stand in for a non-NCCL library")
    fake_search.update(torch=["/torch/lib/libnccl.so.2"], system=[libc])
    with pytest.raises(RuntimeError) as info:
        _search.load_library()
    msg = str(info.value)
    assert "/torch/lib/libnccl.so.2 (torch/lib): no such file" in msg
    assert f"{libc} (ctypes.util.find_library('nccl')): {libc} has no symbol ncclGetVersion" in msg


def test_loaded_paths_reads_the_process_maps(tmp_path: Any) -> None:
    maps = tmp_path / "maps"
    maps.write_text(
        "7f00-7f01 r-xp 00000000 08:01 1 /usr/lib/libc.so.6\n"
        "7f02-7f03 r-xp 00000000 08:01 2 /site/nvidia/nccl/lib/libnccl.so.2\n"
        "7f03-7f04 r--p 00001000 08:01 2 /site/nvidia/nccl/lib/libnccl.so.2\n"
        "7f05-7f06 rw-p 00000000 00:00 0 \n"
    )
    assert _search._loaded_paths(str(maps)) == ["/site/nvidia/nccl/lib/libnccl.so.2"]
    assert _search._loaded_paths(str(tmp_path / "absent")) == []


def test_pip_paths_finds_the_nvidia_namespace_package(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    lib = tmp_path / "nvidia" / "nccl" / "lib" / "libnccl.so.2"
    lib.parent.mkdir(parents=True)
    lib.write_bytes(b"")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert str(lib) in _search._pip_paths()


# --- the real library (the nvidia-nccl wheel), no GPU needed ----------------------------------

def _real_library() -> NcclLibrary:
    if not _search.nccl_available():
        pytest.skip("no libnccl here (install the nvidia-nccl-cu12/cu13 wheel to run this test)")
    return _search.get_library()


def test_real_library_version_and_error_strings() -> None:
    lib = _real_library()
    major, minor, _ = lib.version
    assert major == 2 and minor >= 10, lib.version  # ncclAvg needs 2.10
    assert "invalid argument" in lib.error_string(4)
    assert "unhandled cuda error" in lib.error_string(1)
    with pytest.raises(NcclError, match=r"^NCCL error in ncclAllGather: invalid argument") as info:
        lib.check("ncclAllGather", 4)
    assert isinstance(info.value, RuntimeError) and info.value.code == 4
    again = pickle.loads(pickle.dumps(info.value))  # crosses process boundaries intact
    assert (type(again), str(again), again.code) == (NcclError, str(info.value), 4)
    lib.group_start()
    lib.group_end()


def test_real_unique_ids_are_128_fresh_bytes() -> None:
    _real_library()
    a, b = api.getUniqueId(), api.getUniqueId()
    assert len(a) == len(b) == 128 and a != b


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error path of a machine without a GPU")
def test_real_comm_init_without_gpu_raises_nccls_error() -> None:
    lib = _real_library()
    with pytest.raises(RuntimeError, match=r"^NCCL error in ncclCommInitRank: \w+"):
        lib.comm_init_rank(2, api.getUniqueId(), 1)
    with pytest.raises(ValueError, match="128 bytes, got 3"):
        lib.comm_init_rank(2, b"abc", 1)


# --- unique id exchange ------------------------------------------------------------------------

class _FakeIds:
    def __init__(self) -> None:
        self.n = 0

    def get_unique_id(self) -> bytes:
        self.n += 1
        return bytes([self.n]) * 128


def test_unique_id_exchange_through_a_store() -> None:
    store = torch.distributed.HashStore()
    lib: Any = _FakeIds()
    key = f"test-uid-{os.getpid()}"
    # one process plays both ranks: the root publishes under the key, the other rank reads it
    root_first = exchange_unique_id(store, key, True, lib)
    assert exchange_unique_id(store, key, False, lib) == root_first == b"\x01" * 128
    again = f"{key}/again"  # a later group gets a key of its own, as each init's keys carry its generation
    root_again = exchange_unique_id(store, again, True, lib)
    assert exchange_unique_id(store, again, False, lib) == root_again == b"\x02" * 128


# --- NcclCommunicator's calls into NCCL (recorded by a fake library) ---------------------------

class _RecordingLib:
    path = "fake-libnccl"

    def __init__(self, version: tuple[int, int, int] = (2, 21, 5)) -> None:
        self.version = version
        self.calls: list[tuple[Any, ...]] = []
        self.fail_group_end = False

    def __getattr__(self, name: str) -> Any:
        def record(*args: Any) -> None:
            self.calls.append((name, *args))
            if name == "group_end" and self.fail_group_end:
                raise NcclError("ncclGroupEnd", 5, "invalid usage")
        return record


class _CpuHandle:
    """Duck-types NCCLCommunicator on the CPU so the communicator's arguments can be checked."""

    def __init__(self, lib: _RecordingLib) -> None:
        self.library = lib
        self.ptr = 0xC0
        self.device = torch.device("cpu")
        self.destroyed = False

    def destroy(self) -> None:
        self.destroyed = True
        self.library.calls.append(("destroy",))


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> tuple[NcclCommunicator, _RecordingLib]:
    monkeypatch.setattr(nccl_comm_mod, "stream_of", lambda device: 0x57)
    lib = _RecordingLib()
    comm = NcclCommunicator(_CpuHandle(lib), (3, 5), 1)  # type: ignore[arg-type]
    return comm, lib


def test_communicator_passes_pointers_counts_types_and_stream(
    recorded: tuple[NcclCommunicator, _RecordingLib],
) -> None:
    comm, lib = recorded
    assert (comm.rank, comm.size, comm.global_ranks) == (1, 2, (3, 5))
    x = torch.zeros(6)
    out = torch.zeros(12)
    comm.all_gather(x, out)
    assert lib.calls[-1] == ("all_gather", x.data_ptr(), out.data_ptr(), 6, NcclDataType.FLOAT32, 0xC0, 0x57)
    h = torch.zeros(3, dtype=torch.bfloat16)
    full = torch.zeros(2, 3, dtype=torch.bfloat16)
    comm.reduce_scatter(full, h, "avg")
    assert lib.calls[-1] == ("reduce_scatter", full.data_ptr(), h.data_ptr(), 3, NcclDataType.BFLOAT16,
                             NcclRedOp.AVG, 0xC0, 0x57)
    b = torch.zeros(4, dtype=torch.bool)
    comm.all_reduce(b, "sum")
    assert lib.calls[-1] == ("all_reduce", b.data_ptr(), b.data_ptr(), 4, NcclDataType.UINT8,
                             NcclRedOp.MAX, 0xC0, 0x57)
    i = torch.zeros(5, dtype=torch.int64)
    o = torch.zeros(5, dtype=torch.int64)
    comm.broadcast(i, 0, output=o)
    assert lib.calls[-1] == ("broadcast", i.data_ptr(), o.data_ptr(), 5, NcclDataType.INT64, 0, 0xC0, 0x57)
    comm.reduce(i, 1, "min", output=o)
    assert lib.calls[-1] == ("reduce", i.data_ptr(), o.data_ptr(), 5, NcclDataType.INT64, NcclRedOp.MIN, 1,
                             0xC0, 0x57)
    comm.send(x, 0)
    assert lib.calls[-1] == ("send", x.data_ptr(), 6, NcclDataType.FLOAT32, 0, 0xC0, 0x57)
    comm.recv(o, 0)
    assert lib.calls[-1] == ("recv", o.data_ptr(), 5, NcclDataType.INT64, 0, 0xC0, 0x57)
    n = len(lib.calls)
    comm.all_reduce(torch.zeros(0))  # nothing to move: no NCCL call
    assert len(lib.calls) == n


def test_communicator_rejects_what_nccl_cannot_do(
    recorded: tuple[NcclCommunicator, _RecordingLib],
) -> None:
    comm, lib = recorded
    with pytest.raises(TypeError, match="torch.int16"):
        comm.all_reduce(torch.zeros(3, dtype=torch.int16))
    with pytest.raises(TypeError, match=r"input dtype \(torch.float32\) must equal output dtype \(torch.float16\)"):
        comm.all_gather(torch.zeros(2), torch.zeros(4, dtype=torch.float16))
    with pytest.raises(ValueError, match="peer \\(1\\) must be another rank"):
        comm.send(torch.zeros(2), 1)
    lib.version = (2, 9, 9)
    with pytest.raises(RuntimeError, match=r"avg needs NCCL >= 2.10 .* is 2\.9\.9"):
        comm.all_reduce(torch.zeros(2), "avg")
    comm.all_reduce(torch.zeros(2, dtype=torch.bool), "avg")  # bool avg is a max: fine on old NCCL


def test_group_brackets_calls_and_stays_balanced_on_errors(
    recorded: tuple[NcclCommunicator, _RecordingLib],
) -> None:
    comm, lib = recorded
    t = torch.zeros(2)
    with comm.group():
        comm.send(t, 0)
        comm.recv(t, 0)
    assert [c[0] for c in lib.calls] == ["group_start", "send", "recv", "group_end"]
    lib.calls.clear()
    lib.fail_group_end = True
    with pytest.raises(KeyError, match="inside"):  # the body's error wins over group_end's
        with comm.group():
            raise KeyError("inside")
    assert [c[0] for c in lib.calls] == ["group_start", "group_end"]
    with pytest.raises(NcclError, match="NCCL error in ncclGroupEnd: invalid usage"):
        with comm.group():
            pass
    comm.close()
    comm.close()
    assert [c[0] for c in lib.calls].count("destroy") == 1 and comm.closed


def test_raw_handle_checks() -> None:
    lib: Any = _RecordingLib()
    with pytest.raises(ValueError, match="cuda:N"):
        NCCLCommunicator(0x10, torch.device("cpu"), lib)
    raw = NCCLCommunicator(0x10, torch.device("cuda", 0), lib)  # no CUDA call is made here
    with pytest.raises(ValueError, match="src is on cpu but the NCCL communicator works on cuda:0"):
        api.allReduce(torch.zeros(2), torch.zeros(2), "sum", raw)
    with pytest.raises(TypeError, match="comm must be an NCCLCommunicator .* got int"):
        api.broadcast(torch.zeros(2), torch.zeros(2), 0, 42)  # type: ignore[arg-type]
    raw.destroy()
    with pytest.raises(RuntimeError, match="was destroyed"):
        api.commDestroy(raw)


@pytest.mark.filterwarnings("ignore:TypedStorage is deprecated")
def test_buffers_are_storages_used_whole_or_tensors() -> None:
    t = torch.arange(6, dtype=torch.float32)
    typed = t[2:].storage()
    b = api._buffer("src", typed)
    assert (b.ptr, b.count, b.dtype) == (t.data_ptr(), 6, torch.float32)
    assert torch.equal(b.tensor(), t)
    u = api._buffer("src", t.untyped_storage())
    assert (u.ptr, u.count, u.dtype, u.tensor().numel()) == (t.data_ptr(), 24, torch.uint8, 24)
    v = api._buffer("dst", t[1:])
    assert (v.ptr, v.count) == (t[1:].data_ptr(), 5)
    with pytest.raises(ValueError, match="dst must be contiguous"):
        api._buffer("dst", torch.zeros(4, 4).t())
    with pytest.raises(TypeError, match="src must be a tensor or a storage, got list"):
        api._buffer("src", [1, 2])  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="groupEnd\\(\\) called without a matching groupStart"):
        api.groupEnd()


# --- the low-level functions on bmt Communicators (gloo), 2 ranks -------------------------------

def _low_level_api_on_gloo() -> None:
    import bmt_comm.nccl as nccl

    comm = bmt_comm.get_context().comms.world
    r, n = comm.rank, comm.size
    assert (nccl.commCount(comm), nccl.commRank(comm)) == (n, r)
    # allGather between typed storages, used whole
    src = torch.full((3,), float(r + 1))
    dst = torch.zeros(3 * n)
    nccl.allGather(src.storage(), dst.storage(), comm)
    assert dst.tolist() == [1.0] * 3 + [2.0] * 3
    # allReduce on untyped storages of uint8 data (bytes), in place
    bytes_ = torch.tensor([1, 2, 3], dtype=torch.uint8) * (r + 1)
    nccl.allReduce(bytes_.untyped_storage(), bytes_.untyped_storage(), "sum", comm)
    assert bytes_.tolist() == [3, 6, 9]
    # reduceScatter / broadcast / reduce on tensors
    full = torch.arange(4, dtype=torch.int64) + 10 * r
    part = torch.zeros(2, dtype=torch.int64)
    nccl.reduceScatter(full, part, "max", comm)
    assert part.tolist() == [[10, 11], [12, 13]][r]
    b = torch.full((2,), float(r))
    out = torch.zeros(2)
    nccl.broadcast(b, out, 1, comm)
    assert out.tolist() == [1.0, 1.0]
    red = torch.full((2,), float(r + 1))
    nccl.reduce(red, red, "prod", 0, comm)
    if r == 0:
        assert red.tolist() == [2.0, 2.0]
    # paired send/recv both ways inside groupStart/groupEnd
    mine = torch.full((4,), float(r))
    theirs = torch.empty(4)
    nccl.groupStart()
    nccl.send(mine, 1 - r, comm)
    nccl.recv(theirs, 1 - r, comm)
    nccl.groupEnd()
    assert theirs.tolist() == [float(1 - r)] * 4
    # errors
    try:
        nccl.allGather(src, torch.zeros(4), comm)
    except ValueError as e:
        assert "dst size (4) must be a multiple of src size (3)" in str(e)
    else:
        raise AssertionError("allGather accepted a dst of the wrong size")
    try:
        nccl.allReduce(src, torch.zeros(3, dtype=torch.float64), "sum", comm)
    except TypeError as e:
        assert "src dtype (torch.float32) must equal dst dtype (torch.float64)" in str(e)
    else:
        raise AssertionError("allReduce accepted different dtypes")


@pytest.mark.filterwarnings("ignore:TypedStorage is deprecated")
@pytest.mark.world_size(2)
def test_low_level_api_runs_on_bmt_communicators(spawn: Any) -> None:
    spawn(_low_level_api_on_gloo)
