"""The C++ CPU Adam against its torch fallback: every SIMD level, dtype pair, size and thread count."""

from __future__ import annotations

import multiprocessing as mp
import queue
from typing import Any

import numpy as np
import pytest
import torch
from bmt_optim.cpu_adam import CpuAdamBackend, cpu_adam_update, native_module
from bmt_optim.kernels_adam import AdamScalars

from .native import check_native_built, requires_native

pytestmark = requires_native


@pytest.fixture(autouse=True)
def _native_built() -> None:
    check_native_built()

LEVELS = ["avx512", "avx2", "scalar"]
FLOATS = [torch.float32, torch.float16, torch.bfloat16]
SIZES = [1, 15, 16, 33, 70_001]  # tails of every kind; the large one splits over threads
S = AdamScalars.make(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, step=3, scale=3.0, maximize=True)


def levels() -> list[str]:
    mod = native_module()
    assert mod is not None
    best = mod.best_simd()
    return LEVELS[LEVELS.index(best):]


@pytest.fixture
def simd() -> Any:
    mod = native_module()
    assert mod is not None
    yield mod
    mod.set_simd(mod.best_simd())


def problem(n: int, grad_dtype: torch.dtype, seed: int = 0) -> tuple[list[torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = [torch.randn(n, generator=g), torch.randn(n, generator=g) * 0.1, torch.rand(n, generator=g) * 0.01]
    grad = (torch.randn(n, generator=g) * 50).to(grad_dtype)
    return state, grad


@pytest.mark.parametrize("grad_dtype", FLOATS, ids=str)
def test_native_matches_torch(simd: Any, grad_dtype: torch.dtype) -> None:
    for level in levels():
        simd.set_simd(level)
        assert simd.simd() == level
        for out_dtype in [None, *FLOATS]:
            for n in SIZES:
                for threads in (1, 3) if n > 1000 else (1,):
                    state, grad = problem(n, grad_dtype)
                    a, b = [t.clone() for t in state], [t.clone() for t in state]
                    oa = None if out_dtype is None else torch.empty(n, dtype=out_dtype)
                    ob = None if out_dtype is None else torch.empty(n, dtype=out_dtype)
                    used = cpu_adam_update(*a, grad, oa, S, num_threads=threads)
                    cpu_adam_update(*b, grad, ob, S, backend=CpuAdamBackend.TORCH)
                    assert used is CpuAdamBackend.NATIVE
                    where = f"{level} grad {grad_dtype} out {out_dtype} n={n} threads={threads}"
                    # moments agree to the bit (same roundings); the master to torch's sqrt (0.5 ulp)
                    assert torch.equal(a[1], b[1]), where
                    assert torch.equal(a[2], b[2]), where
                    torch.testing.assert_close(a[0], b[0], rtol=1e-6, atol=1e-7, msg=where)
                    if oa is not None:
                        assert torch.equal(oa, a[0].to(out_dtype)), f"out is the master rounded: {where}"


def test_conversions_of_special_values(simd: Any) -> None:
    """fp16/bf16 rounding (to nearest even), overflow to inf, subnormals, inf and nan as torch."""
    specials = torch.tensor(
        [0.0, -0.0, 1.0, 65504.0, 65520.0, 1e6, -1e6, 6e-8, 1e-40, 3.0e38, 1.00390625, 1.01171875,
         float("inf"), float("-inf"), float("nan")] * 3 + [0.1 * i for i in range(-20, 21)]
    )
    n = specials.numel()
    zero = AdamScalars.make(lr=0.0, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step=1)
    for level in levels():
        simd.set_simd(level)
        for out_dtype in (torch.float16, torch.bfloat16):
            for grad_dtype in FLOATS:
                # a zero gradient leaves the master as it is (inf and nan included): out is its rounding
                grad = specials.to(grad_dtype)
                out = torch.empty(n, dtype=out_dtype)
                cpu_adam_update(specials.clone(), torch.zeros(n), torch.zeros(n), torch.zeros(n, dtype=grad_dtype),
                                out, zero, num_threads=1)
                want = specials.to(out_dtype)
                same = (out == want) | (out.isnan() & want.isnan())
                assert bool(same.all()), f"{level} {out_dtype}: {out[~same]} vs {want[~same]}"
                # the gradient is read exactly: from zero, v = (1 - beta2) * g * g
                expect_v = torch.zeros(n).addcmul_(grad.float(), grad.float(), value=1 - 0.999)
                got_v = torch.zeros(n)
                cpu_adam_update(specials.clone(), torch.zeros(n), got_v, grad, None, zero, num_threads=1)
                assert torch.equal(got_v.nan_to_num(), expect_v.nan_to_num()), level


def test_bias_correction_division_is_exact(simd: Any) -> None:
    """sqrt(v) / bc2_sqrt is computed without a divide (a reciprocal and a Markstein correction):
    the update equals torch's true fp32 division bit for bit over v's whole exponent range,
    subnormals, 0, inf and nan included, at every step's bias correction."""
    g = torch.Generator().manual_seed(1)
    n = 1 << 15
    v0 = torch.ldexp(torch.rand(n, generator=g) + 0.5, torch.randint(-149, 127, (n,), generator=g)).float()
    v0[:6] = torch.tensor([0.0, float("inf"), float("nan"), 1e-45, 3.4e38, 1.0])
    m0 = torch.randn(n, generator=g)
    for level in levels():
        simd.set_simd(level)
        for step in (1, 2, 3, 10, 1000, 100_000):
            s = AdamScalars.make(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step=step)
            p, m, v = torch.zeros(n), m0.clone(), v0.clone()
            cpu_adam_update(p, m, v, torch.zeros(n), None, s, num_threads=1)
            # m and v come out of the kernel (their bits are checked above); the update from them in
            # numpy, whose fp32 divide is IEEE's (torch's tensor / scalar multiplies by 1 / scalar)
            f32 = np.float32
            with np.errstate(invalid="ignore", divide="ignore"):
                denom = np.sqrt(v.numpy()) / f32(s.bc2_sqrt) + f32(s.eps)
                want = torch.from_numpy(f32(0.0) - (m.numpy() * f32(s.step_size)) / denom)
            same = (p == want) | (p.isnan() & want.isnan())
            assert bool(same.all()), f"{level} step {step}: v={v[~same][:4]} got {p[~same][:4]} want {want[~same][:4]}"


def test_argument_checks(simd: Any) -> None:
    state, grad = problem(8, torch.float32)
    with pytest.raises(ValueError, match="exp_avg of 8 elements"):
        cpu_adam_update(state[0], state[1][:4], state[2], grad, None, S)
    with pytest.raises(ValueError, match="master of dtype torch.float32, got torch.float16"):
        cpu_adam_update(state[0].half(), state[1], state[2], grad, None, S)
    with pytest.raises(ValueError, match="contiguous grad"):
        cpu_adam_update(state[0], state[1], state[2], torch.zeros(16)[::2], None, S)
    with pytest.raises(ValueError, match="num_threads must be >= 1, got 0"):
        cpu_adam_update(*state, grad, None, S, num_threads=0)
    with pytest.raises(ValueError, match="simd level must be"):
        simd.set_simd("sse9")
    with pytest.raises(ValueError, match="step must be >= 1"):
        AdamScalars.make(lr=1.0, beta1=0.9, beta2=0.9, eps=0.0, weight_decay=0.0, step=0)


def _numpy_problem(n: int) -> list[torch.Tensor]:
    """Built without torch kernels: torch's own OpenMP pool is not usable in a forked child."""
    rng = np.random.default_rng(0)
    return [torch.from_numpy(rng.standard_normal(n, dtype=np.float32)) for _ in range(4)]


def _child_runs_kernel(q: Any) -> None:
    master, m, v, grad = _numpy_problem(200_000)
    v.numpy()[:] = np.abs(v.numpy())
    cpu_adam_update(master, m, v, grad, None, S, num_threads=2)
    q.put(master.numpy().copy())


def test_thread_pool_survives_fork() -> None:
    """A child forked after the pool started (e.g. a DataLoader worker) builds its own pool."""
    state, grad = problem(200_000, torch.bfloat16)
    cpu_adam_update(*state, grad, None, S, num_threads=2)  # the parent's pool now exists
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    proc = ctx.Process(target=_child_runs_kernel, args=(q,))
    proc.start()
    try:
        got = q.get(timeout=30)
    except queue.Empty:
        pytest.fail("the forked child hung in the CPU Adam thread pool")
    finally:
        proc.kill()
        proc.join()
    master, m, v, grad = _numpy_problem(200_000)
    v.abs_()
    cpu_adam_update(master, m, v, grad, None, S, backend=CpuAdamBackend.TORCH)
    torch.testing.assert_close(torch.from_numpy(got), master, rtol=1e-6, atol=1e-7)


def _direction(before: list[torch.Tensor], after: list[torch.Tensor], s: AdamScalars) -> torch.Tensor:
    """The update direction m_hat / (sqrt(v_hat) + eps) + wd * p_old in float64 from the kernel's
    new moments and the old master."""
    p_old = before[0].double()
    m, v = after[1].double(), after[2].double()
    return (m * s.inv_bc1) / (v.sqrt() / s.bc2_sqrt + s.eps) + s.weight_decay * p_old


@pytest.mark.parametrize("backend", [CpuAdamBackend.NATIVE, CpuAdamBackend.TORCH], ids=str)
def test_update_statistics(simd: Any, backend: CpuAdamBackend) -> None:
    """``delta`` receives the sum and the sum of squares of the update direction, added to what it
    held, over every element (tails included, padding lanes not), at each SIMD level and thread count."""
    # eps 0: a zero-padded tail lane would give 0/0 = nan, so counting one cannot go unseen
    s = AdamScalars.make(lr=1e-2, beta1=0.9, beta2=0.999, eps=0.0, weight_decay=0.1, step=3, scale=3.0)
    for level in levels() if backend is CpuAdamBackend.NATIVE else ["torch"]:
        if backend is CpuAdamBackend.NATIVE:
            simd.set_simd(level)
        for n in SIZES:
            for threads in (1, 3):
                state, grad = problem(n, torch.bfloat16)
                before = [t.clone() for t in state]
                delta = torch.tensor([1.5, 2.5], dtype=torch.float64)  # sums are added to this
                cpu_adam_update(*state, grad, None, s, num_threads=threads, backend=backend, delta=delta)
                d = _direction(before, state, s)
                want = torch.tensor([1.5 + d.sum().item(), 2.5 + d.square().sum().item()], dtype=torch.float64)
                # fp32 rounding of each direction (~1e-7 relative) against a float64 reference
                tol = 1e-6 * (d.abs().sum().item() + 1.0)
                where = f"{level} n={n} threads={threads}"
                assert abs(delta[0].item() - want[0].item()) <= tol, where
                torch.testing.assert_close(delta[1], want[1], rtol=1e-6, atol=0.0, msg=where)
                # the update itself is the same with and without statistics
                plain = [t.clone() for t in before]
                cpu_adam_update(*plain, grad, None, s, num_threads=threads, backend=backend)
                for a, b in zip(plain, state, strict=True):
                    assert torch.equal(a, b), where


def test_update_statistics_checks_its_buffer() -> None:
    state, grad = problem(8, torch.float32)
    with pytest.raises(ValueError, match=r"delta of dtype torch.float64, got torch.float32"):
        cpu_adam_update(*state, grad, None, S, delta=torch.zeros(2))
    with pytest.raises(ValueError, match=r"delta of 2 elements \(sum and sum of squares\), got 3"):
        cpu_adam_update(*state, grad, None, S, delta=torch.zeros(3, dtype=torch.float64))


def test_stream_probe_adds_the_gradient_to_three_arrays() -> None:
    """The benchmarks' memory ceiling does the traffic it claims: three arrays read and written."""
    mod = native_module()
    assert mod is not None
    n = 70_001
    a, b, c, g = (torch.randn(n) for _ in range(4))
    want = [t + g for t in (a, b, c)]
    mod.stream_probe(a.data_ptr(), b.data_ptr(), c.data_ptr(), g.data_ptr(), n, 3)
    for got, w in zip((a, b, c), want, strict=True):
        assert torch.equal(got, w)
    with pytest.raises(ValueError, match="num_threads >= 1, got n=8, num_threads=0"):
        mod.stream_probe(a.data_ptr(), b.data_ptr(), c.data_ptr(), g.data_ptr(), 8, 0)


@pytest.mark.parametrize("backend", [CpuAdamBackend.NATIVE, CpuAdamBackend.TORCH], ids=str)
def test_out_of_place_equals_in_place_and_leaves_the_inputs(simd: Any, backend: CpuAdamBackend) -> None:
    """``into``: the new master and moments go elsewhere, bit for bit the in-place result, and
    the inputs are only read (the speculative offload update drops such a result unseen)."""
    for level in levels() if backend is CpuAdamBackend.NATIVE else ["-"]:
        if backend is CpuAdamBackend.NATIVE:
            simd.set_simd(level)
        for n in SIZES:
            state, grad = problem(n, torch.bfloat16)
            ref, src = [t.clone() for t in state], [t.clone() for t in state]
            into = (torch.full((n,), 7.0), torch.full((n,), 7.0), torch.full((n,), 7.0))
            out_ref, out = torch.empty(n, dtype=torch.bfloat16), torch.empty(n, dtype=torch.bfloat16)
            cpu_adam_update(*ref, grad, out_ref, S, backend=backend, num_threads=3)
            cpu_adam_update(*src, grad, out, S, backend=backend, num_threads=3, into=into)
            where = f"{backend} {level} n={n}"
            for name, a, b in zip(("master", "exp_avg", "exp_avg_sq"), ref, into, strict=True):
                assert torch.equal(a, b), f"{where}: the new {name} differs from the in-place update's"
            assert torch.equal(out, out_ref), where
            for name, a, b in zip(("master", "exp_avg", "exp_avg_sq"), src, state, strict=True):
                assert torch.equal(a, b), f"{where}: the out-of-place update wrote its input {name}"


def test_out_of_place_arguments_are_checked() -> None:
    state, grad = problem(8, torch.float32)
    with pytest.raises(ValueError, match=r"the new exp_avg \(into\) of 8 elements"):
        cpu_adam_update(*state, grad, None, S, into=(torch.zeros(8), torch.zeros(4), torch.zeros(8)))
    mod = native_module()
    assert mod is not None
    ptr = state[0].data_ptr()
    with pytest.raises(ValueError, match="all three .* or none"):
        mod.adam_step(ptr, state[1].data_ptr(), state[2].data_ptr(), grad.data_ptr(), 0, 0, 0, 8, 1.0, 0.1, 0.9, 0.1,
                      1e-8, 1e-3, 1.0, 1.0, 1, master_out=torch.zeros(8).data_ptr())
