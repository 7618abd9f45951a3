"""AdamOffloadOptimizer: against AdamW, native vs fallback, chunked pipeline, state and gathering."""

from __future__ import annotations

import io
import math
import warnings
from typing import Any

import bmt_comm
import pytest
import torch
from bmt_optim import AdamOffloadOptimizer, AdamOptimizer
from bmt_optim import cpu_adam as cpu_adam_mod
from bmt_optim.cpu_adam import CpuAdamBackend

from ..harness import run_distributed
from ._adam_reference import DTYPES, HP, SCALE, grads_for, make_params, master_of, run_ours, run_reference
from .native import NATIVE_EXPECTED, check_native_built, requires_native

SHAPES = [(37, 29), (1000,), (3,)]
CHUNK = 64  # small chunks: many per parameter, with a ragged last one
TOL = dict(rtol=1e-6, atol=1e-6)  # 1e-4 of lr: the C++ sqrt rounds correctly, torch's to 0.5 ulp


def offload(params: list[Any], backend: CpuAdamBackend | None = None, **kw: Any) -> AdamOffloadOptimizer:
    opt = AdamOffloadOptimizer(params, chunk_numel=CHUNK, num_threads=2, **{**HP, **kw})
    opt._cpu_backend = backend
    return opt


@pytest.mark.parametrize("decoupled", [False, True], ids=["l2", "decoupled"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_torch_20_steps(dtype: torch.dtype, decoupled: bool) -> None:
    if NATIVE_EXPECTED:
        check_native_built()  # fails where a compiler is here but the extension is missing
    for backend in ([CpuAdamBackend.NATIVE] if NATIVE_EXPECTED else []) + [CpuAdamBackend.TORCH]:
        params = make_params(SHAPES, dtype)
        start = [p.detach().clone() for p in params]
        opt = offload(params, backend, decoupled_weight_decay=decoupled)
        run_ours(opt, params, 1, 20)
        for p, r in zip(params, run_reference(start, 20, decoupled=decoupled), strict=True):
            m = master_of(opt, p)
            if backend is CpuAdamBackend.TORCH or dtype == torch.float32:
                # fp32: torch's own Adam/AdamW on the host; the fallback: AdamW's arithmetic
                assert torch.equal(m, r), f"expected torch's bits: {(m - r).abs().max()}"
            else:
                torch.testing.assert_close(m, r, **TOL)
            assert torch.equal(p.detach(), m.to(dtype))
            st = opt.state[p]
            assert st["_param_fp32"].shape == (p.numel(),) and st["exp_avg"].device.type == "cpu"


@requires_native
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_native_matches_fallback(dtype: torch.dtype) -> None:
    check_native_built()
    a, b = make_params(SHAPES, dtype), make_params(SHAPES, dtype)
    oa, ob = offload(a, CpuAdamBackend.NATIVE, maximize=True), offload(b, CpuAdamBackend.TORCH, maximize=True)
    run_ours(oa, a, 1, 20, scale=3.0)
    run_ours(ob, b, 1, 20, scale=3.0)
    for p, q in zip(a, b, strict=True):
        for k in ("_param_fp32", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(oa.state[p][k], ob.state[q][k], rtol=1e-6, atol=1e-6)


def test_hold_steps_and_maximize_per_group() -> None:
    a, b = make_params([(70,), (90,)], torch.bfloat16)
    start = [a.detach().clone(), b.detach().clone()]
    opt = AdamOffloadOptimizer(
        [{"params": [a]}, {"params": [b], "maximize": True}], hold_steps=2, chunk_numel=CHUNK, **HP  # type: ignore[arg-type]
    )
    run_ours(opt, [a, b], 1, 2)
    assert torch.equal(a.detach(), start[0]) and torch.equal(b.detach(), start[1])
    run_ours(opt, [a, b], 3, 8)
    torch.testing.assert_close(master_of(opt, a), run_reference([start[0]], 8, hold_steps=2)[0], **TOL)
    torch.testing.assert_close(master_of(opt, b), run_reference(start, 8, hold_steps=2, maximize=True)[1], **TOL)


def test_state_dict_round_trip_mid_training() -> None:
    params = make_params(SHAPES, torch.bfloat16)
    opt = offload(params)
    run_ours(opt, params, 1, 5)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = offload(twins)
    opt2.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    run_ours(opt, params, 6, 9)
    run_ours(opt2, twins, 6, 9)
    for p, q in zip(params, twins, strict=True):
        assert torch.equal(p, q)
        for k in ("exp_avg", "exp_avg_sq", "_param_fp32"):
            assert torch.equal(opt.state[p][k], opt2.state[q][k])


@pytest.mark.parametrize("backend", [CpuAdamBackend.NATIVE, CpuAdamBackend.TORCH], ids=str)
def test_record_delta(backend: CpuAdamBackend) -> None:
    """BMTrain's record_delta (positional, after hold_steps): per parameter ``_delta_info`` =
    [mean, var, sum, sum_sq] of the update direction m_hat / (sqrt(v_hat) + eps) + wd * p_old, and
    the same over all stepped parameters from get_avg_delta/get_var_delta; the updates themselves
    are those of an optimizer without it. The direction is recomputed here in float64 from the
    moments after the step and the master before it."""
    if backend is CpuAdamBackend.NATIVE:
        check_native_built()
    lr, betas, eps, wd = HP["lr"], HP["betas"], HP["eps"], HP["weight_decay"]
    params, twins = make_params(SHAPES, torch.bfloat16), make_params(SHAPES, torch.bfloat16)
    opt = AdamOffloadOptimizer(params, lr, betas, eps, wd, 1, True, chunk_numel=CHUNK, num_threads=2)
    plain = AdamOffloadOptimizer(twins, lr, betas, eps, wd, 1, chunk_numel=CHUNK, num_threads=2)
    opt._cpu_backend = plain._cpu_backend = backend
    assert opt.get_avg_delta() == 0.0 and plain.get_var_delta() == 0.0
    for step in range(1, 4):  # step 1 is held (lr 0): the statistics are recorded all the same
        old = [(master_of(opt, p) if opt.state[p] else p.detach()).double().flatten() for p in params]
        run_ours(opt, params, step, step)
        run_ours(plain, twins, step, step)
        dirs = []
        for p, q, p_old in zip(params, twins, old, strict=True):
            assert torch.equal(p, q)
            st = opt.state[p]
            m, v = st["exp_avg"].double(), st["exp_avg_sq"].double()
            d = m / (1 - betas[0] ** step) / (v.sqrt() / math.sqrt(1 - betas[1] ** step) + eps) + wd * p_old
            dirs.append(d)
            want = torch.tensor([d.mean(), d.var(unbiased=False), d.sum(), d.square().sum()], dtype=torch.float64)
            torch.testing.assert_close(st["_delta_info"].double(), want, rtol=1e-5, atol=1e-6)
        every = torch.cat(dirs)
        assert math.isclose(opt.get_avg_delta(), every.mean().item(), rel_tol=1e-5, abs_tol=1e-7)
        assert math.isclose(opt.get_var_delta(), every.var(unbiased=False).item(), rel_tol=1e-5)
        assert plain.get_avg_delta() == 0.0 and "_delta_info" not in plain.state[twins[0]]
    with pytest.raises(TypeError, match="record_delta must be a bool, got 'yes'"):
        AdamOffloadOptimizer(params, record_delta="yes")  # type: ignore[arg-type]


def test_errors() -> None:
    with pytest.raises(ValueError, match="got torch.float64"):
        AdamOffloadOptimizer([torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))])
    with pytest.raises(ValueError, match=r"beta1 must be in \[0, 1\), got 1.5"):
        AdamOffloadOptimizer(make_params([(2,)], torch.float32), betas=(1.5, 0.9))
    with pytest.raises(ValueError, match="num_threads must be >= 1, got 0"):
        AdamOffloadOptimizer(make_params([(2,)], torch.float32), num_threads=0)
    with pytest.raises(ValueError, match="chunk_numel must be >= 1, got 0"):
        AdamOffloadOptimizer(make_params([(2,)], torch.float32), chunk_numel=0)
    p = torch.nn.Parameter(torch.zeros(4, 3).t())
    p.grad = torch.zeros(3, 4)
    with pytest.raises(ValueError, match="contiguous"):
        AdamOffloadOptimizer([p]).step()
    q = torch.nn.Parameter(torch.zeros(3))
    q.grad = torch.sparse_coo_tensor([[1]], [1.0], (3,), check_invariants=True)
    with pytest.raises(ValueError, match="sparse"):
        AdamOffloadOptimizer([q]).step()


def test_fallback_warns_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_adam_mod, "_native", None)
    monkeypatch.setattr(cpu_adam_mod, "_native_error", "simulated: not built")
    import bmt_comm

    monkeypatch.setattr(bmt_comm.process_state().slot(cpu_adam_mod._FallbackWarning), "issued", False)
    params = make_params([(10,)], torch.bfloat16)
    start = [p.detach().clone() for p in params]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        opt = AdamOffloadOptimizer(params, chunk_numel=CHUNK, **HP)  # type: ignore[arg-type]
        AdamOffloadOptimizer(make_params([(3,)], torch.float32))
        run_ours(opt, params, 1, 3)
    msgs = [str(w.message) for w in seen if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1 and "simulated: not built" in msgs[0], msgs
    assert torch.equal(master_of(opt, params[0]), run_reference(start, 3)[0])


# ---------------------------------------------------------------- sharded state, gathered

FULL_SHAPES = [(33, 17), (3,), (64,)]  # (3,) leaves rank 3 of 4 an empty shard
WHOLE_SHAPE = (5,)  # a parameter every rank holds whole


def _shards(
    world: int, rank: int, dtype: torch.dtype, device: torch.device
) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """(full CPU params, this rank's shards + one whole param on ``device``), shards marked as
    ``bmt_comm.Shard``s over the zero group."""
    full = make_params(FULL_SHAPES + [WHOLE_SHAPE], dtype)
    mine = []
    for f in full[:-1]:
        n = f.numel()
        per = -(-n // world)
        start, end = min(n, rank * per), min(n, (rank + 1) * per)
        p = torch.nn.Parameter(f.detach().reshape(-1)[start:end].to(device, copy=True))
        bmt_comm.mark_shard(p, start, end, n, bmt_comm.get_context().comms.zero)
        mine.append(p)
    mine.append(torch.nn.Parameter(full[-1].detach().to(device, copy=True)))
    return full, mine


def _set_shard_grads(full: list[torch.Tensor], mine: list[torch.Tensor], step: int) -> None:
    for p, g in zip(mine, grads_for(full, step), strict=True):
        flat = (g * SCALE).to(p.dtype).reshape(-1)
        if isinstance(p, bmt_comm.Shard):
            flat = flat[p.shard_start : p.shard_end]
        p.grad = flat.reshape(p.shape).to(p.device, copy=True)


def _train_gather_check(save_to: str, first: int, last: int, load_from: str | None) -> bool:
    """For both optimizers: ``_one_kind`` (one spawned run checks both)."""
    for kind in ("offload", "adam"):
        _one_kind(kind, f"{save_to}.{kind}", first, last, None if load_from is None else f"{load_from}.{kind}")
    return True


def _one_kind(kind: str, save_to: str, first: int, last: int, load_from: str | None) -> None:
    """On every rank: (reload), train shards for steps first..last, gather; rank 0 checks the whole
    state against one process training the full parameters for steps 1..last."""
    ctx = bmt_comm.get_context()
    dtype = torch.bfloat16
    full, mine = _shards(ctx.world_size, ctx.rank, dtype, ctx.device)
    cls: Any = AdamOffloadOptimizer if kind == "offload" else AdamOptimizer
    extra = {"chunk_numel": 50} if kind == "offload" else {}
    opt = cls(mine, **HP, **extra)
    if load_from is not None:
        sd = torch.load(load_from)
        assert sd["is_whole"]
        opt.load_state_dict(sd)
        for i, p in enumerate(mine):  # the model checkpoint's part: parameters = master rounded
            p.data.copy_(opt.state[p]["_param_fp32"].reshape(p.shape).to(dtype))
            assert opt.state[p]["step"] == first - 1, i
    for t in range(first, last + 1):
        _set_shard_grads(full, mine, t)
        opt.step(scale=SCALE)
    sd = opt.state_dict(gather=True)
    assert sd["is_whole"] is True
    if ctx.rank != 0:
        assert sd["state"] == {}
        return
    torch.save(sd, save_to)
    ref = cls(full, **HP, **extra)
    run_ours(ref, full, 1, last)
    assert sorted(sd["state"]) == list(range(len(full)))
    for i, f in enumerate(full):
        got, want = sd["state"][i], ref.state[f]
        assert got["step"] == want["step"] == last
        for k in ("exp_avg", "exp_avg_sq", "_param_fp32"):
            assert got[k].shape == (f.numel(),) and got[k].device.type == "cpu"
            if kind == "adam" and ctx.device.type == "cuda":  # Triton on GPU vs torch ops on CPU
                torch.testing.assert_close(got[k], want[k].reshape(-1), rtol=1e-6, atol=1e-6)
            else:  # the same arithmetic on the same elements: equal to the bit
                assert torch.equal(got[k], want[k].reshape(-1)), (i, k)


@pytest.mark.world_size(2)
def test_gathered_state_reloads_at_another_world_size(spawn: Any, tmp_path: Any) -> None:
    """Gather at world 2, reload and train at world 4, gather there, reload in one process."""
    first, second = str(tmp_path / "a.pt"), str(tmp_path / "b.pt")
    assert all(spawn(_train_gather_check, first, 1, 4, None))
    # on CPU/gloo even on a GPU host, as `spawn` runs tests without a gpu marker
    assert all(run_distributed(_train_gather_check, 4, second, 5, 7, first, env={"CUDA_VISIBLE_DEVICES": ""}))
    # and in one process without bmt_comm: the shards of a one-rank group are the whole parameters
    for kind in ("offload", "adam"):
        sd = torch.load(f"{second}.{kind}")
        params = make_params(FULL_SHAPES + [WHOLE_SHAPE], torch.bfloat16)
        opt: Any = AdamOffloadOptimizer(params, **HP) if kind == "offload" else AdamOptimizer(params, **HP)  # type: ignore[arg-type]
        opt.load_state_dict(sd)
        for p in params:
            p.data.copy_(opt.state[p]["_param_fp32"].reshape(p.shape).to(p.dtype))
        run_ours(opt, params, 8, 9)
        ref_params = make_params(FULL_SHAPES + [WHOLE_SHAPE], torch.bfloat16)
        ref = AdamOffloadOptimizer(ref_params, **HP)  # type: ignore[arg-type]
        run_ours(ref, ref_params, 1, 9)
        for p, q in zip(params, ref_params, strict=True):
            torch.testing.assert_close(master_of(opt, p), master_of(ref, q), **TOL)


def test_host_arena_lays_out_views_and_survives_a_refused_lock(monkeypatch: Any) -> None:
    """``HostArena``: one allocation, 64-byte aligned views of each size and dtype; when the
    driver refuses to page-lock it, a PinnedMemoryWarning and ordinary memory, not an error in
    the middle of a backward."""
    from bmt_optim._host_arena import HostArena, PinnedMemoryWarning

    sizes = [(3, torch.bfloat16), (5, torch.float32), (0, torch.float16), (7, torch.bfloat16)]
    arena = HostArena(sizes, pin=False)
    views = [arena.view(i) for i in range(len(sizes))]
    assert [(v.numel(), v.dtype) for v in views] == sizes
    assert all(o % 64 == 0 for o in arena.offsets)
    for v in views:
        v.fill_(1)
    assert views[1].sum().item() == 5  # the views do not overlap

    class Refusing:
        def cudaHostRegister(self, ptr: int, size: int, flags: int) -> int:  # noqa: N802 - CUDA's name
            return 2  # cudaErrorMemoryAllocation

    monkeypatch.setattr(torch.cuda, "cudart", lambda: Refusing())
    with pytest.warns(PinnedMemoryWarning, match="ulimit -l"):
        refused = HostArena(sizes, pin=True)
    refused.view(3).fill_(2)
    refused.close()  # nothing was locked: nothing to unlock


def test_grad_stream_copies_what_it_is_asked_for() -> None:
    """``GradStream.collect``: host copies equal to the gradients, also for a parameter frozen when
    the host memory was laid out and unfrozen later, and for a gradient whose dtype is not its
    parameter's; a copy is redone when the gradient changed in place."""
    from bmt_optim._grad_stream import GradStream

    a = torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))
    b = torch.nn.Parameter(torch.zeros(3), requires_grad=False)
    stream = GradStream()
    try:
        stream.track([a, b])
        a.grad = torch.arange(4, dtype=torch.bfloat16)
        (host,) = stream.collect([a])
        assert torch.equal(host, a.grad)
        b.requires_grad_(True)
        b.grad = torch.full((3,), 2.0)
        if hasattr(a, "grad_dtype"):
            a.grad_dtype = None  # newer torch refuses a gradient of another dtype unless asked
        a.grad = torch.arange(4, dtype=torch.float32) + 0.5
        ha, hb = stream.collect([a, b])
        assert torch.equal(ha, a.grad) and ha.dtype == torch.float32 and torch.equal(hb, b.grad)
        a.grad.mul_(3)  # changed in place since: copied again
        (ha,) = stream.collect([a])
        assert torch.equal(ha, a.grad)
    finally:
        stream.close()
