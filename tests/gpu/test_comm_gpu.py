"""The communicators on 2 GPUs: bmt's NCCL binding and the torch.distributed transport.

Every collective is checked against the value computed here from all ranks' inputs (which each
rank can rebuild: they are seeded by rank) and against the same call on CPU through gloo. Inputs
are small integers, so sums, averages of two, products and their fp16/bf16 roundings are exact
and results must be equal, not close.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

import bmt_comm
import pytest
import torch
import torch.distributed as dist
from bmt_comm.communicator import Communicator
from bmt_comm.torch_communicator import TorchCommunicator

from tests.harness import run_distributed

pytestmark = pytest.mark.gpus(2)

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.int64)
REDUCE_OPS = ("sum", "avg", "max", "min", "prod")
SCATTER_OPS = ("sum", "avg", "max", "min")


# --- expected values ---------------------------------------------------------------------------

def _input(rank: int, numel: int, dtype: torch.dtype, salt: int = 0) -> torch.Tensor:
    """Rank ``rank``'s input, on CPU: integers in [-8, 8], the same on every rank that builds it."""
    g = torch.Generator().manual_seed(1000 * salt + rank)
    return torch.randint(-8, 9, (numel,), generator=g).to(dtype)


def _reduce(xs: list[torch.Tensor], op: str) -> torch.Tensor:
    dtype = xs[0].dtype
    wide = torch.stack([x.to(torch.float64 if dtype.is_floating_point else torch.int64) for x in xs])
    if op == "sum":
        out = wide.sum(0)
    elif op == "avg":
        s = wide.sum(0)
        out = s / len(xs) if dtype.is_floating_point else torch.div(s, len(xs), rounding_mode="trunc")
    elif op == "max":
        out = wide.max(0).values
    elif op == "min":
        out = wide.min(0).values
    else:
        out = wide.prod(0)
    return out.to(dtype)


def _same(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    got = got.detach().cpu()
    if got.dtype != want.dtype or not torch.equal(got.reshape(want.shape), want):
        raise AssertionError(f"{name}: got {got.flatten()[:8].tolist()} ({got.dtype}), "
                             f"want {want.flatten()[:8].tolist()} ({want.dtype})")


# --- the collectives, on any communicator -----------------------------------------------------

def _run_collectives(comm: Communicator, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every collective once on ``comm``'s device; results on CPU, keyed by a readable name."""
    r, n, dev = comm.rank, comm.size, comm.device
    res: dict[str, torch.Tensor] = {}

    x = _input(r, 5, dtype).to(dev)
    out = torch.empty(n * 5, dtype=dtype, device=dev)
    res["all_gather"] = comm.all_gather(x, out).cpu()
    big = _input(r, (1 << 20) + 3, dtype, salt=1).to(dev)  # several NCCL chunks, odd size
    big_out = torch.empty(n * big.numel(), dtype=dtype, device=dev)
    res["all_gather_big"] = comm.all_gather(big, big_out).cpu()

    for op in SCATTER_OPS:
        full = _input(r, n * 3, dtype, salt=2).to(dev)
        part = torch.empty(3, dtype=dtype, device=dev)
        res[f"reduce_scatter_{op}"] = comm.reduce_scatter(full, part, op).cpu()

    for op in REDUCE_OPS:
        t = _input(r, 7, dtype, salt=3).to(dev)
        res[f"all_reduce_{op}"] = comm.all_reduce(t, op, output=torch.empty_like(t)).cpu()
    inplace = _input(r, 7, dtype, salt=3).to(dev)
    comm.all_reduce(inplace, "sum")
    res["all_reduce_sum_inplace"] = inplace.cpu()

    for root in range(n):
        b = _input(r, 6, dtype, salt=4).to(dev)
        res[f"broadcast_{root}"] = comm.broadcast(b, root, output=torch.empty_like(b)).cpu()
    b = _input(r, 6, dtype, salt=4).to(dev)
    comm.broadcast(b, n - 1)
    res["broadcast_inplace"] = b.cpu()

    red = _input(r, 4, dtype, salt=5).to(dev)
    red_out = torch.zeros_like(red)
    comm.reduce(red, n - 1, "sum", output=red_out)
    if r == n - 1:
        res["reduce_sum"] = red_out.cpu()
    red_avg = _input(r, 4, dtype, salt=5).to(dev)
    comm.reduce(red_avg, 0, "avg")
    if r == 0:
        res["reduce_avg_inplace"] = red_avg.cpu()

    # a ring of sends: to the next rank, from the previous one (even ranks send first)
    mine = _input(r, 9, dtype, salt=6).to(dev)
    got = torch.empty_like(mine)
    nxt, prv = (r + 1) % n, (r - 1) % n
    if r % 2 == 0:
        comm.send(mine, nxt)
        comm.recv(got, prv)
    else:
        comm.recv(got, prv)
        comm.send(mine, nxt)
    res["send_recv"] = got.cpu()
    return res


def _expected(rank: int, n: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    want: dict[str, torch.Tensor] = {
        "all_gather": torch.cat([_input(q, 5, dtype) for q in range(n)]),
        "all_gather_big": torch.cat([_input(q, (1 << 20) + 3, dtype, salt=1) for q in range(n)]),
    }
    for op in SCATTER_OPS:
        want[f"reduce_scatter_{op}"] = _reduce([_input(q, n * 3, dtype, salt=2) for q in range(n)], op)[
            rank * 3 : rank * 3 + 3
        ]
    for op in REDUCE_OPS:
        want[f"all_reduce_{op}"] = _reduce([_input(q, 7, dtype, salt=3) for q in range(n)], op)
    want["all_reduce_sum_inplace"] = want["all_reduce_sum"]
    for root in range(n):
        want[f"broadcast_{root}"] = _input(root, 6, dtype, salt=4)
    want["broadcast_inplace"] = _input(n - 1, 6, dtype, salt=4)
    if rank == n - 1:
        want["reduce_sum"] = _reduce([_input(q, 4, dtype, salt=5) for q in range(n)], "sum")
    if rank == 0:
        want["reduce_avg_inplace"] = _reduce([_input(q, 4, dtype, salt=5) for q in range(n)], "avg")
    want["send_recv"] = _input((rank - 1) % n, 9, dtype, salt=6)
    return want


def _gloo_comm() -> TorchCommunicator:
    """The same ranks as the world communicator, on CPU through the gloo group bmt made for objects."""
    ctx = bmt_comm.get_context()
    ranks = ctx.comms.world.global_ranks
    return TorchCommunicator(ctx.object_groups[ranks], ranks, ctx.comms.world.rank, torch.device("cpu"))


def _check_collectives(expected_type: type) -> list[str]:
    ctx = bmt_comm.get_context()
    comm = ctx.comms.world
    if not isinstance(comm, expected_type) or comm.device != ctx.device or ctx.device.type != "cuda":
        raise AssertionError(f"expected a {expected_type.__name__} on {ctx.device}, got {comm!r}")
    gloo = _gloo_comm()
    checked = []
    for dtype in DTYPES:
        got = _run_collectives(comm, dtype)
        ref = _run_collectives(gloo, dtype)
        want = _expected(comm.rank, comm.size, dtype)
        if set(got) != set(want) or set(ref) != set(want):
            raise AssertionError(f"ran {sorted(got)} / {sorted(ref)}, expected {sorted(want)}")
        for name in want:
            _same(f"{name} {dtype} vs expected", got[name], want[name])
            _same(f"{name} {dtype} vs gloo", got[name], ref[name])
            checked.append(f"{name}:{dtype}")
    # bool reduces as or (sum) / and (min)
    flags = torch.tensor([True, False, comm.rank == 0, False], device=comm.device)
    _same("bool sum", comm.all_reduce(flags, "sum", output=torch.empty_like(flags)),
          torch.tensor([True, False, True, False]))
    _same("bool min", comm.all_reduce(flags, "min", output=torch.empty_like(flags)),
          torch.tensor([True, False, False, False]))
    return checked


# --- streams and groups ------------------------------------------------------------------------

def _check_streams_and_groups() -> None:
    ctx = bmt_comm.get_context()
    comm, dev, r, n = ctx.comms.world, ctx.device, ctx.rank, ctx.world_size
    m = 1 << 20
    x = torch.zeros(m, device=dev)
    y = torch.zeros(m, device=dev)
    out = torch.empty(n * m, device=dev)
    comm.all_gather(x, out)  # warm-up: NCCL connects lazily, on the first call of a kind
    comm.all_reduce(y, "sum")
    torch.cuda.synchronize(dev)

    # work on a side stream runs after what was queued before it there, and not before
    side = torch.cuda.Stream(device=dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side):
        torch.cuda._sleep(1_000_000_000)  # ~0.5 s: a collective on the wrong stream would read zeros
        x.fill_(r + 1)
        comm.all_gather(x, out)
        y.copy_(x)
        comm.all_reduce(y, "sum")
    if side.query():
        raise AssertionError("the collectives blocked the host until the side stream drained")
    torch.cuda.current_stream(dev).wait_stream(side)
    want = torch.cat([torch.full((m,), float(q + 1)) for q in range(n)])
    _same("all_gather on a side stream", out, want)
    _same("all_reduce on a side stream", y, torch.full((m,), float(sum(range(1, n + 1)))))

    # several collectives in one group
    a = torch.full((1000,), float(r + 1), device=dev)
    b = torch.full((3,), r + 10, dtype=torch.int64, device=dev)
    g_in = torch.full((1000,), float(r), device=dev)  # held: the group launches after the calls return
    g_out = torch.empty(n * 1000, device=dev)
    with comm.group():
        comm.all_reduce(a, "max")
        comm.all_reduce(b, "sum")
        comm.all_gather(g_in, g_out)
    _same("grouped all_reduce max", a, torch.full((1000,), float(n)))
    _same("grouped all_reduce sum", b, torch.full((3,), sum(q + 10 for q in range(n)), dtype=torch.int64))
    _same("grouped all_gather", g_out, torch.cat([torch.full((1000,), float(q)) for q in range(n)]))

    # paired sends and receives both ways: 64 MiB each, which would deadlock outside a group
    big = 1 << 24
    mine = torch.full((big,), float(r), device=dev)
    theirs = [torch.empty(big, device=dev) for _ in range(n)]
    with comm.group():
        for peer in range(n):
            if peer != r:
                comm.send(mine, peer)
                comm.recv(theirs[peer], peer)
    for peer in range(n):
        if peer != r:
            _same(f"grouped recv from {peer}", theirs[peer][:: 1 << 16], torch.full((256,), float(peer)))


# --- autograd collectives and errors ------------------------------------------------------------

def _weight(rank: int, shape: tuple[int, ...]) -> torch.Tensor:
    return _input(rank, int(torch.Size(shape).numel()), torch.float32, salt=7).reshape(shape)


def _check_autograd_and_errors() -> None:
    ctx = bmt_comm.get_context()
    comm, dev, r, n = ctx.comms.world, ctx.device, ctx.rank, ctx.world_size
    xs = [_input(q, 12, torch.float32, salt=8).reshape(4, 3) for q in range(n)]
    w = _weight(r, (4, 3)).to(dev)

    x = xs[r].to(dev, copy=True).requires_grad_()
    y = bmt_comm.all_gather(x)  # (n, 4, 3)
    _same("all_gather forward", y, torch.stack(xs))
    wg = torch.stack([_weight(q + 3, (4, 3)) for q in range(n)]).to(dev)
    (y * wg).sum().backward()
    _same("all_gather backward", x.grad, wg[r].cpu())

    for op in ("sum", "avg", "max"):
        x = xs[r].to(dev, copy=True).requires_grad_()
        y = bmt_comm.all_reduce(x, op)
        _same(f"all_reduce {op} forward", y, _reduce(xs, op))
        (y * w).sum().backward()
        if op == "sum":
            want = w.cpu()
        elif op == "avg":
            want = w.cpu() / n
        else:
            want = w.cpu() * (xs[r] == _reduce(xs, "max")).float()
        _same(f"all_reduce {op} backward", x.grad, want)

    big = [_input(q, n * 2 * 3, torch.float32, salt=9).reshape(n * 2, 3) for q in range(n)]
    x = big[r].to(dev, copy=True).requires_grad_()
    y = bmt_comm.reduce_scatter(x, "sum")  # (2, 3)
    _same("reduce_scatter forward", y, _reduce(big, "sum")[r * 2 : r * 2 + 2])
    (y * _weight(r, (2, 3)).to(dev)).sum().backward()
    _same("reduce_scatter backward", x.grad, torch.cat([_weight(q, (2, 3)) for q in range(n)]))

    root = n - 1
    x = xs[r].to(dev, copy=True).requires_grad_()
    y = bmt_comm.broadcast(x, root)
    _same("broadcast forward", y, xs[root])
    (y * w).sum().backward()
    # the reference's rule: every rank gets the sum of all ranks' gradients
    _same("broadcast backward", x.grad, sum((_weight(q, (4, 3)) for q in range(n)), torch.zeros(4, 3)))

    def expect(exc: type[BaseException], text: str, fn: Callable[[], Any]) -> None:
        try:
            fn()
        except exc as e:
            if text not in str(e):
                raise AssertionError(f"{exc.__name__} without {text!r}: {e}") from e
        else:
            raise AssertionError(f"no {exc.__name__} ({text!r})")

    f32 = torch.zeros(4, device=dev)
    expect(TypeError, "input dtype (torch.float32) must equal output dtype (torch.float16)",
           lambda: comm.all_gather(f32, torch.zeros(4 * n, dtype=torch.float16, device=dev)))
    expect(ValueError, f"input is on cpu but this communicator works on {dev}",
           lambda: comm.all_reduce(torch.zeros(4), "sum"))
    expect(ValueError, "must be contiguous", lambda: comm.all_reduce(torch.zeros(4, 4, device=dev).t()))
    expect(ValueError, "reduce op must be one of", lambda: comm.all_reduce(f32, "mean"))
    torch.cuda.synchronize(dev)


# --- the reference's low-level bmt.nccl functions --------------------------------------------

def _check_reference_api() -> None:
    import bmt_comm.nccl as nccl

    ctx = bmt_comm.get_context()
    dev, r, n = ctx.device, ctx.rank, ctx.world_size
    uid = bmt_comm.broadcast_object(nccl.getUniqueId() if r == 0 else None)
    comm = nccl.commInitRank(uid, n, r)
    if (nccl.commCount(comm), nccl.commRank(comm), comm.device) != (n, r, dev):
        raise AssertionError(f"commInitRank gave {nccl.commCount(comm)}, {nccl.commRank(comm)}, {comm.device}")

    # typed storages, used whole (a view's storage is its base's)
    base = torch.arange(8, dtype=torch.float32, device=dev) + 100 * r
    total = torch.zeros(8, device=dev)
    nccl.allReduce(base[2:].storage(), total.storage(), "sum", comm)
    _same("allReduce on storages", total, sum(torch.arange(8, dtype=torch.float32) + 100 * q for q in range(n)))
    # untyped storages: bytes
    src = torch.full((4,), float(r), dtype=torch.bfloat16, device=dev)
    dst = torch.zeros(4 * n, dtype=torch.bfloat16, device=dev)
    nccl.allGather(src.untyped_storage(), dst.untyped_storage(), comm)
    _same("allGather on untyped storages", dst, torch.cat([torch.full((4,), float(q), dtype=torch.bfloat16)
                                                            for q in range(n)]))
    full = torch.arange(2 * n, dtype=torch.int64, device=dev) * (r + 1)
    part = torch.zeros(2, dtype=torch.int64, device=dev)
    nccl.reduceScatter(full, part, "max", comm)
    _same("reduceScatter", part, torch.arange(2 * n, dtype=torch.int64)[2 * r : 2 * r + 2] * n)
    b = torch.full((5,), float(r), dtype=torch.float16, device=dev)
    nccl.broadcast(b.storage(), b.storage(), n - 1, comm)
    _same("broadcast in place", b, torch.full((5,), float(n - 1), dtype=torch.float16))
    red = torch.full((3,), r + 1, dtype=torch.int32, device=dev)
    red_out = torch.zeros_like(red)
    nccl.reduce(red, red_out, "prod", 0, comm)
    if r == 0:
        _same("reduce prod", red_out, torch.full((3,), math.factorial(n), dtype=torch.int32))
    mine = torch.full((1 << 20,), float(r), device=dev)
    theirs = torch.empty(1 << 20, device=dev)
    peer = (r + 1) % n
    nccl.groupStart()
    nccl.send(mine.storage(), peer, comm)
    nccl.recv(theirs.storage(), (r - 1) % n, comm)
    nccl.groupEnd()
    _same("send/recv in a group", theirs[::4096], torch.full((256,), float((r - 1) % n)))
    torch.cuda.synchronize(dev)

    # NCCL's own error, surfaced: a peer that is not in the communicator
    messages = []
    nccl.groupStart()
    try:
        nccl.send(mine, n + 5, comm)
    except RuntimeError as e:
        messages.append(str(e))
    finally:
        try:
            nccl.groupEnd()
        except RuntimeError as e:
            messages.append(str(e))
    nccl_own = ("NCCL error in ncclSend: invalid ", "NCCL error in ncclGroupEnd: invalid ")
    if not messages or not all(m.startswith(nccl_own) for m in messages):
        raise AssertionError(f"a bad peer should raise NCCL's own 'invalid argument/usage', got {messages}")
    comm.abort()  # after a failed group the communicator is not trusted
    if not comm.destroyed:
        raise AssertionError("the communicator still has a pointer after abort")


# --- the torch.distributed transport on GPUs ---------------------------------------------------

def _with_torch_transport() -> list[str]:
    """Re-initialise on a default group that has NCCL for CUDA tensors (the harness's is gloo only)."""
    from torch.distributed.distributed_c10d import _get_default_store

    if os.environ.get("BMT_COMM_BACKEND") != "torch":
        raise AssertionError("this check must run with BMT_COMM_BACKEND=torch")
    bmt_comm.destroy()
    if "nccl" not in str(dist.get_backend_config()):
        store = _get_default_store()
        rank, n = dist.get_rank(), dist.get_world_size()
        dist.destroy_process_group()
        dist.init_process_group("cpu:gloo,cuda:nccl", store=dist.PrefixStore("bmt-gpu-test/", store),
                                rank=rank, world_size=n)
    bmt_comm.init_distributed()
    if bmt_comm.get_context().backend != "torch":
        raise AssertionError(f"backend is {bmt_comm.get_context().backend}, expected torch")
    checked = _check_collectives(TorchCommunicator)
    _check_streams_and_groups()
    _check_autograd_and_errors()
    return checked


# --- tests -------------------------------------------------------------------------------------

def _nccl_collectives() -> list[str]:
    from bmt_comm.nccl import NcclCommunicator

    return _check_collectives(NcclCommunicator)


@pytest.mark.world_size(2)
def test_nccl_collectives_equal_expected_and_gloo(spawn: Any) -> None:
    checked = spawn(_nccl_collectives)
    assert [len(c) for c in checked] == [len(DTYPES) * 17] * 2, checked


@pytest.mark.world_size(2)
def test_nccl_side_streams_and_groups(spawn: Any) -> None:
    spawn(_check_streams_and_groups)


@pytest.mark.world_size(2)
def test_nccl_autograd_collectives_and_errors(spawn: Any) -> None:
    spawn(_check_autograd_and_errors)


@pytest.mark.world_size(2)
@pytest.mark.filterwarnings("ignore:TypedStorage is deprecated")
def test_nccl_reference_low_level_api(spawn: Any) -> None:
    spawn(_check_reference_api)


def test_torch_transport_on_gpus_runs_the_same_checks() -> None:
    checked = run_distributed(_with_torch_transport, 2, init_kwargs={}, env={"BMT_COMM_BACKEND": "torch"})
    assert [len(c) for c in checked] == [len(DTYPES) * 17] * 2, checked
