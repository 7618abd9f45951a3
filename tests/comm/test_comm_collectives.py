"""Every ``Communicator`` collective on gloo, against the same computation in one process.

Each rank's input is rebuilt from its rank (a seeded generator), so every rank can compute the
expected result from all ranks' inputs. Inputs are small integers stored in the tested dtype:
sums, products and averages (over 1, 2 or 4 ranks) are then exact in fp16/bf16/int8 too, and
results are compared with ``torch.equal``. A random-normal fp32 pass adds non-integer values.
"""

from __future__ import annotations

import pytest
import torch

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int8]
OPS = ["sum", "avg", "max", "min", "prod"]


def small_ints(seed: int, shape: tuple[int, ...], dtype: torch.dtype, nonzero: bool = False) -> torch.Tensor:
    """Integers in [-3, 3] as ``dtype``: a product over 4 ranks (<= 81) fits int8 and bf16 exactly."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(-3, 4, shape, generator=g)
    if nonzero:
        t[t == 0] = 2
    return t.to(dtype)


def reference_reduce(ts: list[torch.Tensor], op: str) -> torch.Tensor:
    """The reduction computed in one process, in float64/int64, cast back to the inputs' dtype."""
    dtype = ts[0].dtype
    wide = torch.stack([t.double() if t.is_floating_point() else t.long() for t in ts])
    n = len(ts)
    if op == "sum":
        out = wide.sum(0)
    elif op == "avg":
        out = wide.sum(0) / n if dtype.is_floating_point else torch.div(wide.sum(0), n, rounding_mode="trunc")
    elif op == "max":
        out = wide.amax(0)
    elif op == "min":
        out = wide.amin(0)
    elif op == "prod":
        out = wide.prod(0)
    else:
        raise ValueError(op)
    return out.to(dtype)


def _eq(got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    got = got.cpu()
    assert got.dtype == expected.dtype, (what, got.dtype, expected.dtype)
    assert torch.equal(got, expected), f"{what}: got {got.tolist()} expected {expected.tolist()}"


def _check_collectives() -> None:
    import bmt_comm

    ctx = bmt_comm.get_context()
    comm = ctx.comms.world
    n, r, dev = comm.size, comm.rank, ctx.device
    for di, dtype in enumerate(DTYPES):
        def inputs(
            salt: int, shape: tuple[int, ...], nonzero: bool = False, di: int = di, dtype: torch.dtype = dtype
        ) -> list[torch.Tensor]:
            return [small_ints(10_000 * salt + 100 * k + di, shape, dtype, nonzero) for k in range(n)]

        tag = str(dtype)
        # layouts (in place, output=, 2-D, blocking p2p) do not depend on the dtype: two dtypes suffice
        layouts = dtype in (torch.float32, torch.int8)
        # all_gather of odd-length inputs into a preallocated output of another shape
        xs = inputs(1, (7,))
        out = torch.full((n, 7), 99, dtype=dtype, device=dev)
        assert comm.all_gather(xs[r].to(dev), out) is out
        _eq(out, torch.stack(xs), f"all_gather {tag}")
        if layouts:
            xs = inputs(2, (3, 5))
            out = torch.empty(n * 3, 5, dtype=dtype, device=dev)
            comm.all_gather(xs[r].to(dev), out)
            _eq(out, torch.cat(xs), f"all_gather 2-D {tag}")
            # in place: the input is this rank's slice of the output (as ZeRO gathers do)
            out = torch.zeros(n * 7, dtype=dtype, device=dev)
            xs = inputs(3, (7,))
            out[r * 7 : (r + 1) * 7] = xs[r].to(dev)
            comm.all_gather(out[r * 7 : (r + 1) * 7], out)
            _eq(out, torch.cat(xs), f"all_gather in place {tag}")

        for oi, op in enumerate(OPS):
            what = f"{op} {tag}"
            # reduce_scatter of 11 elements: padded to a multiple of n, as users do
            xs = inputs(4 + oi, (11,))
            padded_len = bmt_comm.round_up(11, n)
            pad = [torch.cat([x, torch.ones(padded_len - 11, dtype=dtype)]) for x in xs]
            chunk = padded_len // n
            out = torch.empty(chunk, dtype=dtype, device=dev)
            assert comm.reduce_scatter(pad[r].to(dev), out, op) is out
            _eq(out, reference_reduce(pad, op)[r * chunk : (r + 1) * chunk], f"reduce_scatter {what}")
            if layouts:
                whole = torch.empty(padded_len, dtype=dtype, device=dev)
                comm.all_gather(out, whole)
                _eq(whole[:11], reference_reduce(xs, op), f"reduce_scatter+all_gather {what}")
                # in place: output is this rank's chunk of the input
                buf = pad[r].to(dev).clone()
                comm.reduce_scatter(buf, buf[r * chunk : (r + 1) * chunk], op)
                _eq(buf[r * chunk : (r + 1) * chunk], reference_reduce(pad, op)[r * chunk : (r + 1) * chunk],
                    f"reduce_scatter in place {what}")
            # all_reduce in place and into an output of another shape
            xs = inputs(20 + oi, (2, 3))
            t = xs[r].to(dev).clone()
            assert comm.all_reduce(t, op) is t
            _eq(t, reference_reduce(xs, op), f"all_reduce {what}")
            if layouts:
                src = xs[r].to(dev)
                out = torch.empty(6, dtype=dtype, device=dev)
                comm.all_reduce(src, op, output=out)
                _eq(out, reference_reduce(xs, op).view(-1), f"all_reduce output= {what}")
                _eq(src, xs[r], f"all_reduce output= leaves input {what}")
            # reduce to the last rank; a non-root in-place input is left as it was
            root = n - 1
            t = xs[r].to(dev).clone()
            comm.reduce(t, root, op)
            _eq(t, reference_reduce(xs, op) if r == root else xs[r], f"reduce {what}")
            if layouts:
                out = torch.empty(2, 3, dtype=dtype, device=dev)
                comm.reduce(xs[r].to(dev), root, op, output=out)
                if r == root:
                    _eq(out, reference_reduce(xs, op), f"reduce output= {what}")

        for root in {0, n - 1}:
            xs = inputs(40 + root, (5,))
            t = xs[r].to(dev).clone()
            assert comm.broadcast(t, root) is t
            _eq(t, xs[root], f"broadcast root {root} {tag}")
            if layouts:
                out = torch.empty(5, dtype=dtype, device=dev)
                comm.broadcast(xs[r].to(dev), root, output=out)
                _eq(out, xs[root], f"broadcast output= root {root} {tag}")

        if n > 1:
            xs = inputs(50, (9,))
            nxt, prv = (r + 1) % n, (r - 1) % n
            if layouts:
                got = torch.empty(9, dtype=dtype, device=dev)
                # blocking send/recv around a ring: even ranks send first, odd ranks receive first
                if r % 2 == 0:
                    comm.send(xs[r].to(dev), nxt)
                    comm.recv(got, prv)
                else:
                    comm.recv(got, prv)
                    comm.send(xs[r].to(dev), nxt)
                _eq(got, xs[prv], f"send/recv {tag}")
            # group(): everyone sends first and receives second; batching makes it deadlock-free
            got_prev = torch.empty(9, dtype=dtype, device=dev)
            got_next = torch.empty(9, dtype=dtype, device=dev)
            with comm.group():
                comm.send(xs[r].to(dev), nxt)
                comm.send(xs[r].to(dev), prv)
                with comm.group():  # nested groups post once, at the outermost exit
                    comm.recv(got_prev, prv)
                    comm.recv(got_next, nxt)
            _eq(got_prev, xs[prv], f"group recv from prev {tag}")
            _eq(got_next, xs[nxt], f"group recv from next {tag}")

    # non-integer fp32 values, with a stated tolerance (summation order differs from ours)
    xs = [torch.randn(33, generator=torch.Generator().manual_seed(7 + k)) for k in range(n)]
    t = xs[r].to(dev).clone()
    comm.all_reduce(t, "avg")
    expected = torch.stack(xs).mean(0)  # (torch.testing.assert_close would import DTensor: seconds per rank)
    assert torch.allclose(t.cpu(), expected, rtol=1e-5, atol=1e-6), (t.cpu() - expected).abs().max()
    out = torch.empty(n * 33, device=dev)
    comm.all_gather(xs[r].to(dev), out)
    assert torch.equal(out.cpu(), torch.cat(xs))  # data movement is exact

    comm.barrier()
    bmt_comm.synchronize()


def _check_cpu_transport_dtypes() -> None:
    """gloo has no int16: data moves as bytes, reductions refuse it clearly; bool reduces as or/and."""
    import bmt_comm

    comm = bmt_comm.get_context().comms.world
    n, r = comm.size, comm.rank
    xs = [torch.arange(5, dtype=torch.int16) * (k + 1) - 1000 for k in range(n)]
    out = torch.empty(n, 5, dtype=torch.int16)
    comm.all_gather(xs[r], out)
    _eq(out, torch.stack(xs), "all_gather int16")
    t = xs[r].clone()
    comm.broadcast(t, n - 1)
    _eq(t, xs[n - 1], "broadcast int16")
    with pytest.raises(TypeError, match=r"all_reduce\(sum\) over torch.distributed supports .*got torch.int16"):
        comm.all_reduce(xs[r].clone())
    with pytest.raises(TypeError, match=r"reduce_scatter\(max\).*got torch.int16"):
        comm.reduce_scatter(torch.zeros(n, dtype=torch.int16), torch.zeros(1, dtype=torch.int16), "max")
    flags = [torch.tensor([k == 0, False, True, k % 2 == 1]) for k in range(n)]
    for op, expected in [("sum", torch.stack(flags).any(0)), ("max", torch.stack(flags).any(0)),
                         ("min", torch.stack(flags).all(0)), ("prod", torch.stack(flags).all(0))]:
        t = flags[r].clone()
        comm.all_reduce(t, op)
        _eq(t, expected, f"all_reduce bool {op}")
        t = flags[r].clone()
        comm.reduce(t, 0, op)
        _eq(t, expected if r == 0 else flags[r], f"reduce bool {op}")


def _check_bad_input() -> None:
    """Every check fails before any communication, so all ranks raise the same error."""
    import bmt_comm

    ctx = bmt_comm.get_context()
    comm, dev, n = ctx.comms.world, ctx.device, ctx.comms.world.size
    x = torch.zeros(4, device=dev)
    with pytest.raises(TypeError, match=r"input dtype \(torch.float32\) must equal output dtype \(torch.float16\)"):
        comm.all_gather(x, torch.zeros(4 * n, dtype=torch.float16, device=dev))
    with pytest.raises(TypeError, match=r"torch.int64.*torch.float32"):
        comm.all_reduce(torch.zeros(4, dtype=torch.int64, device=dev), output=x)
    with pytest.raises(ValueError, match=rf"all_gather output numel \({4 * n + 1}\) must be group size "
                                         rf"\({n}\) \* input numel \(4\)"):
        comm.all_gather(x, torch.zeros(4 * n + 1, device=dev))
    with pytest.raises(ValueError, match=rf"reduce_scatter input numel \({4 * n + 1}\) must be group size "
                                         rf"\({n}\) \* output numel \(4\)"):
        comm.reduce_scatter(torch.zeros(4 * n + 1, device=dev), x)
    with pytest.raises(ValueError, match=r"input numel \(4\) must equal output numel \(5\)"):
        comm.all_reduce(x, output=torch.zeros(5, device=dev))
    with pytest.raises(ValueError, match=r"input numel \(4\) must equal output numel \(3\)"):
        comm.broadcast(x, 0, output=torch.zeros(3, device=dev))
    # a tensor on another device: the meta device stands in for a GPU tensor on CPU, and vice versa
    other = torch.empty(4, device="meta")
    for call in (lambda: comm.all_reduce(other), lambda: comm.all_gather(other, torch.empty(4 * n, device=dev)),
                 lambda: comm.broadcast(other, 0), lambda: comm.reduce(other, 0),
                 lambda: comm.reduce_scatter(torch.empty(4 * n, device=dev), other)):
        with pytest.raises(ValueError, match=rf"is on meta but this communicator works on {dev}"):
            call()
    with pytest.raises(ValueError, match=r"is on meta"):
        bmt_comm.all_reduce(other)
    # non-contiguous tensors are rejected, not silently copied
    nc = torch.zeros(4, 3, device=dev).t()
    with pytest.raises(ValueError, match=r"input must be contiguous \(shape \(3, 4\), stride \(1, 3\)\)"):
        comm.all_reduce(nc)
    with pytest.raises(ValueError, match=r"output must be contiguous"):
        comm.all_gather(torch.zeros(3, device=dev), torch.zeros(3, 2 * n, device=dev).t())
    if n > 1:
        with pytest.raises(ValueError, match=r"tensor must be contiguous"):
            comm.send(nc, 1 - comm.rank % 2)
    with pytest.raises(ValueError, match=r"reduce op must be one of \['sum', 'prod', 'max', 'min', 'avg'\], got 'mean'"):
        comm.all_reduce(x, "mean")
    with pytest.raises(TypeError, match=r"reduce op must be a ReduceOp or a string, got int 3"):
        comm.all_reduce(x, 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=rf"root \({n}\) must be a rank in \[0, {n}\)"):
        comm.broadcast(x, n)
    with pytest.raises(ValueError, match=r"root \(-1\)"):
        comm.reduce(x, -1)
    with pytest.raises(ValueError, match=rf"peer \({comm.rank}\) must be another rank in \[0, {n}\) "
                                         rf"of this group \(this rank is {comm.rank}\)"):
        comm.send(x, comm.rank)
    with pytest.raises(ValueError, match=rf"peer \({n}\)"):
        comm.recv(x, n)
    comm.barrier()  # everyone is still in step after all the refused calls


def _suite() -> None:
    import bmt_comm

    _check_collectives()
    _check_bad_input()
    if bmt_comm.get_context().device.type == "cpu":
        _check_cpu_transport_dtypes()


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_communicator_collectives(spawn, world_size):
    spawn(_suite)


@pytest.mark.gpus(2)
@pytest.mark.world_size(2)
def test_communicator_collectives_gpu(spawn):
    spawn(_suite)
