"""Differentiable collectives (``bmt_comm.all_gather`` ...): forward values and the reference's
backward rules (section 11), computed in one process from every rank's inputs.

On rank ``r`` the loss is ``(y * w_r).sum()``, so the gradient reaching ``y`` on rank ``r`` is
``w_r``; every rank rebuilds every ``x_k`` and ``w_k`` from seeded generators. Values are small
integers, so fp16/bf16 results and gradients are exact.
"""

from __future__ import annotations

import pytest
import torch

from .test_comm_collectives import reference_reduce, small_ints

FLOATS = [torch.float32, torch.float16, torch.bfloat16]
INTS = [torch.int64, torch.int32, torch.int8]


def _eq(got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    got = got.detach().cpu()
    assert got.dtype == expected.dtype, (what, got.dtype, expected.dtype)
    assert got.shape == expected.shape, (what, tuple(got.shape), tuple(expected.shape))
    assert torch.equal(got, expected), f"{what}: got {got.tolist()} expected {expected.tolist()}"


def _leaf(x: torch.Tensor, dev: torch.device, transposed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A leaf holding ``x``; with ``transposed`` the op sees a non-contiguous view of it."""
    if transposed:
        leaf = x.t().contiguous().to(dev).requires_grad_()
        return leaf, leaf.t()
    leaf = x.clone().to(dev).requires_grad_()
    return leaf, leaf


def _grad_of(leaf: torch.Tensor, transposed: bool) -> torch.Tensor:
    assert leaf.grad is not None
    return leaf.grad.t() if transposed else leaf.grad


def _check_autograd() -> None:
    import bmt_comm

    ctx = bmt_comm.get_context()
    comm = ctx.comms.world
    n, r, dev = comm.size, comm.rank, ctx.device
    for di, dtype in enumerate(FLOATS):
        def per_rank(
            salt: int, shape: tuple[int, ...], nonzero: bool = False, di: int = di, dtype: torch.dtype = dtype
        ) -> list[torch.Tensor]:
            return [small_ints(10_000 * salt + 100 * k + di, shape, dtype, nonzero) for k in range(n)]

        for transposed in (False, True):
            tag = f"{dtype} {'non-contiguous' if transposed else 'contiguous'}"
            # all_gather: (n, 3, 5); backward keeps this rank's slice of the gradient
            xs, ws = per_rank(1, (3, 5)), per_rank(2, (n, 3, 5))
            leaf, x = _leaf(xs[r], dev, transposed)
            y = bmt_comm.all_gather(x)
            _eq(y, torch.stack(xs), f"all_gather {tag}")
            (y * ws[r].to(dev)).sum().backward()
            _eq(_grad_of(leaf, transposed), ws[r][r], f"all_gather grad {tag}")

            for oi, op in enumerate(["sum", "avg", "max", "min", "prod"]):
                xs, ws = per_rank(10 + oi, (3, 5), nonzero=op == "prod"), per_rank(20 + oi, (3, 5))
                leaf, x = _leaf(xs[r], dev, transposed)
                y = bmt_comm.all_reduce(x, op)
                out = reference_reduce(xs, op)
                _eq(y, out, f"all_reduce {op} {tag}")
                (y * ws[r].to(dev)).sum().backward()
                w = ws[r]
                expected = {
                    "sum": w,  # unchanged
                    "avg": w / n,
                    "max": w * (xs[r] == out).to(dtype),  # zero where own input != result
                    "min": w * (xs[r] == out).to(dtype),
                    "prod": w * out / xs[r],  # x output / input
                }[op]
                _eq(_grad_of(leaf, transposed), expected, f"all_reduce {op} grad {tag}")

            # reduce_scatter over dim 0 (2n rows of 3): rank r keeps rows [2r, 2r+2)
            for oi, op in enumerate(["sum", "avg", "max", "min", "prod"]):
                xs, ws = per_rank(30 + oi, (2 * n, 3)), per_rank(40 + oi, (2, 3))
                leaf, x = _leaf(xs[r], dev, transposed)
                y = bmt_comm.reduce_scatter(x, op)
                _eq(y, reference_reduce(xs, op)[2 * r : 2 * r + 2], f"reduce_scatter {op} {tag}")
                loss = (y * ws[r].to(dev)).sum()
                if op in ("max", "min", "prod"):
                    with pytest.raises(NotImplementedError, match=f"reduce_scatter backward is not defined for op {op}"):
                        loss.backward()
                    continue
                loss.backward()
                expected = torch.cat(ws)  # the all-gather of every rank's output gradient
                if op == "avg":
                    expected = expected / n
                _eq(_grad_of(leaf, transposed), expected, f"reduce_scatter {op} grad {tag}")

            # broadcast: root's values everywhere; every rank's input gets the sum of all grads
            for root in sorted({0, n - 1}):
                xs, ws = per_rank(50 + root, (3, 4)), per_rank(60 + root, (4, 3) if transposed else (3, 4))
                leaf, x = _leaf(xs[r], dev, transposed)
                y = bmt_comm.broadcast(x, root)
                _eq(y, xs[root], f"broadcast root {root} {tag}")
                w = ws[r].t() if transposed else ws[r]
                (y * w.to(dev)).sum().backward()
                total = torch.stack([wk.t() if transposed else wk for wk in ws]).sum(0)
                _eq(_grad_of(leaf, transposed), total, f"broadcast root {root} grad {tag}")

    # integer tensors go through the same ops (no gradient)
    for di, dtype in enumerate(INTS):
        xs = [small_ints(70_000 + 100 * k + di, (2 * n, 3), dtype) for k in range(n)]
        x = xs[r].to(dev)
        _eq(bmt_comm.all_gather(x), torch.stack(xs), f"all_gather {dtype}")
        for op in ("sum", "avg", "max", "min", "prod"):
            _eq(bmt_comm.all_reduce(x, op), reference_reduce(xs, op), f"all_reduce {op} {dtype}")
            _eq(bmt_comm.reduce_scatter(x, op), reference_reduce(xs, op)[2 * r : 2 * r + 2],
                f"reduce_scatter {op} {dtype}")
        _eq(bmt_comm.broadcast(x, n - 1), xs[n - 1], f"broadcast {dtype}")
        _eq(x, xs[r], f"inputs untouched {dtype}")

    # the ops compose: all_gather then reduce_scatter(sum) of the stacked copies is n * x
    x = small_ints(80_000 + r, (4,), torch.float32).to(dev).requires_grad_()
    y = bmt_comm.reduce_scatter(bmt_comm.all_gather(x), "sum")  # (1, 4): rank r's slice, summed
    _eq(y, n * small_ints(80_000 + r, (4,), torch.float32)[None], "all_gather -> reduce_scatter")
    y.sum().backward()
    assert x.grad is not None
    _eq(x.grad, torch.ones(4), "all_gather -> reduce_scatter grad")

    # bad input
    if n > 1:
        with pytest.raises(ValueError, match=rf"reduce_scatter needs dim 0 \({2 * n + 1}\) divisible by the group size \({n}\)"):
            bmt_comm.reduce_scatter(torch.zeros(2 * n + 1, device=dev))
    with pytest.raises(ValueError, match=r"reduce_scatter needs dim 0 \(scalar\)"):
        bmt_comm.reduce_scatter(torch.tensor(1.0, device=dev))
    with pytest.raises(ValueError, match=r"reduce op must be one of"):
        bmt_comm.all_reduce(torch.zeros(2, device=dev), "mean")


def _check_activations() -> None:
    """send_activations/recv_activations down a chain of ranks: shape, dtype and values arrive."""
    import bmt_comm

    ctx = bmt_comm.get_context()
    comm = ctx.comms.world
    n, r, dev = comm.size, comm.rank, ctx.device
    base = torch.arange(60, dtype=torch.float32).view(6, 10)
    cases = [
        base.to(torch.float16),
        base.to(torch.bfloat16)[1:4, 2:7],  # a non-contiguous view of a larger storage
        base.t(),
        base.to(torch.int64)[2],  # an offset view: only its own elements travel
        base.to(torch.int32).view(2, 3, 10),
        base.to(torch.int8).view(60),
        torch.tensor(3.5),  # 0-dim
        torch.ones(0, 4),  # empty
        (base > 30).view(3, 20),  # bool
        base.view(1, 2, 1, 3, 1, 10).double(),
    ]
    if n == 1:
        return
    for i, expected in enumerate(cases):
        if r > 0:
            got = bmt_comm.recv_activations(r - 1, comm)
            assert got.device == dev and not got.requires_grad, (i, got)
            _eq(got, expected, f"activation {i}")
        if r < n - 1:
            x = expected.to(dev).requires_grad_(expected.is_floating_point())
            bmt_comm.send_activations(x, r + 1, comm)
            _eq(x, expected, f"sent activation {i} untouched")
    with pytest.raises(TypeError, match=r"send_activations does not support dtype torch.complex64"):
        bmt_comm.send_activations(torch.zeros(2, dtype=torch.complex64, device=dev), (r + 1) % n, comm)
    with pytest.raises(ValueError, match=r"send_activations supports at most 48 dims, got 49"):
        bmt_comm.send_activations(torch.zeros([1] * 49, device=dev), (r + 1) % n, comm)


def _suite() -> None:
    _check_autograd()
    _check_activations()


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_differentiable_collectives(spawn, world_size):
    spawn(_suite)


@pytest.mark.gpus(2)
@pytest.mark.world_size(2)
def test_differentiable_collectives_gpu(spawn):
    spawn(_suite)
