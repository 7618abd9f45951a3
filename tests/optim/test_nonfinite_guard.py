"""The non-finite guard of OptimManager without a loss scale (``skip_nonfinite``).

An inf/nan in one rank's gradient skips the step on every rank: parameters, optimizer state
(moments, step counts, fp32 masters) and schedulers stay bitwise as they were, one warning is
emitted, ``skipped_steps`` counts it, and the next clean steps match plain ``torch.optim.AdamW``
that skipped the same steps. Tolerances against AdamW: rtol=1e-5, atol=1e-6 on the fp32 values
(parameters for fp32, masters for bf16); a bf16 parameter equals its master rounded.
"""

from __future__ import annotations

import copy
import io
import warnings
from typing import Any

import pytest
import torch
from bmt_optim import AdamOffloadOptimizer, AdamOptimizer, NonFiniteGradientWarning, OptimManager
from bmt_optim.lr_scheduler import Linear
from bmt_optim.nan_check import check_inf_nan_many_, new_flag

from .interpret import needs_triton, run_interpreted

HP = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
TOL = dict(rtol=1e-5, atol=1e-6)
BAD = {2: float("nan"), 4: float("inf")}  # step -> value injected (steps 1..5)


def _snapshot(m: OptimManager, params: list[torch.Tensor]) -> dict[str, Any]:
    """Everything a skipped step must leave bitwise alone (tensors cloned)."""
    def clone(x: Any) -> Any:
        return x.detach().clone() if isinstance(x, torch.Tensor) else copy.deepcopy(x)

    opt_states = [{id(p): {k: clone(v) for k, v in opt.state[p].items()} for p in opt.state} for opt in m.optimizers]
    return {
        "params": [p.detach().clone() for p in params],
        "state": opt_states,
        "lr": [[g["lr"] for g in opt.param_groups] for opt in m.optimizers],
        "sched": [copy.deepcopy(s.state_dict()) if s is not None else None for s in m.lr_schedulers],
    }


def _assert_same(a: Any, b: Any, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b) or (a.isnan() == b.isnan()).all() and torch.equal(a.nan_to_num(), b.nan_to_num()), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _master(opt: torch.optim.Optimizer, p: torch.Tensor) -> torch.Tensor:
    st = opt.state[p]
    return (st["_param_fp32"] if "_param_fp32" in st else p.detach()).reshape(-1).float()


def _grads(full: dict[str, torch.Tensor], t: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + t)
    return {name: torch.randn(v.shape, generator=g) for name, v in full.items()}


def _run_case(dtype: torch.dtype, opt_cls: type, layout: str, skip: bool = True) -> dict[str, Any]:
    """Five steps of one model on this rank; BAD's steps hold an inf/nan on one rank."""
    import bmt_comm
    from bmt_ckpt import Block

    from ..ckpt.models import Config, batch, distribute_, make_layers

    ctx = bmt_comm.get_context()
    rank, world = ctx.rank, ctx.world_size
    case = f"{dtype}, {opt_cls.__name__}, {layout}, skip_nonfinite={skip}"
    cfg = Config()
    layer = make_layers(cfg, seed=0)[0].to(dtype)
    full = {n: p.detach().clone() for n, p in layer.named_parameters()}
    if layout == "block":
        model: torch.nn.Module = Block(distribute_(layer))
        x, _ = batch(cfg, 2, seed=1)
        model(x.to(dtype)).float().sum().backward()  # the gradients become views of the flat shards
    else:
        model = distribute_(layer)
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
    named = list(model.named_parameters())
    params = [p for _, p in named]
    assert all(p.grad is not None for p in params), case

    opt = opt_cls(params, decoupled_weight_decay=True, **HP)  # AdamW for every dtype, as the reference
    sched = Linear(opt, start_lr=HP["lr"], warmup_iter=2, end_iter=10)
    m = OptimManager(skip_nonfinite=skip)
    m.add_optimizer(opt, sched)
    ref = {n: torch.nn.Parameter(v.float().clone()) for n, v in full.items()}
    ref_opt = torch.optim.AdamW(list(ref.values()), **HP)  # type: ignore[arg-type]

    def shard(t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1)[p._start_partition : p._end_partition]

    results = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for t in range(1, 6):
            m.zero_grad()
            grads = _grads(full, t)
            for n, p in named:
                assert p.grad is not None
                p.grad.copy_(shard(grads[n], p).to(dtype))
            bad_rank = {2: world - 1, 4: 0}.get(t)
            if bad_rank == rank:
                first = next(p for p in params if p.numel() > 0)
                first.grad[-1] = BAD[t]  # type: ignore[index]
            before = _snapshot(m, params)
            lr = opt.param_groups[0]["lr"]
            stepped = m.step()
            results.append(stepped)
            if not skip:
                continue
            assert stepped == (bad_rank is None), f"{case}: step {t} stepped={stepped}"
            if not stepped:
                _assert_same(before, _snapshot(m, params), f"{case}: step {t}")
                assert all(p.grad is not None and not p.grad.any() for p in params), f"{case}: grads zeroed"
                continue
            for g in ref_opt.param_groups:
                g["lr"] = lr
            for n, q in ref.items():
                q.grad = grads[n].to(dtype).float()
            ref_opt.step()
            for n, p in named:
                want = shard(ref[n].detach(), p)
                torch.testing.assert_close(_master(opt, p), want, **TOL, msg=lambda s, n=n, t=t: f"{case} {n} step {t}: {s}")
                assert torch.equal(p.detach(), _master(opt, p).to(dtype)), f"{case} {n}: param is its master rounded"
    ours = [w for w in caught if issubclass(w.category, NonFiniteGradientWarning)]
    return {
        "case": case,
        "stepped": results,
        "skipped": m.skipped_steps,
        "steps": m.step_count,
        "sched_iter": sched.num_iter,
        "warnings": [str(w.message) for w in ours],
        "nan_params": any(p.isnan().any().item() for p in params),
    }


def _guard_worker() -> list[dict[str, Any]]:
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        for opt_cls in (AdamOptimizer, AdamOffloadOptimizer):
            for layout in ("block", "plain"):
                out.append(_run_case(dtype, opt_cls, layout))
    for opt_cls in (AdamOptimizer, AdamOffloadOptimizer):
        out.append(_run_case(torch.float32, opt_cls, "block", skip=False))
    return out


@pytest.mark.parametrize("world_size", [2, 4])
def test_nonfinite_gradient_on_one_rank_skips_everywhere(spawn: Any, world_size: int) -> None:
    per_rank = spawn(_guard_worker)
    for rank, cases in enumerate(per_rank):
        for r in cases:
            case = f"rank {rank}: {r['case']}"
            if "skip_nonfinite=False" in r["case"]:
                # 1.0.1's behaviour: every step taken, silently; the ranks that held a nan/inf
                # now hold nan parameters
                assert r["stepped"] == [True] * 5 and r["skipped"] == 0 and r["warnings"] == [], case
                assert r["nan_params"] == (rank in (0, world_size - 1)), case
                continue
            assert r["stepped"] == [True, False, True, False, True], case
            assert (r["skipped"], r["steps"], r["sched_iter"]) == (2, 5, 3), case
            assert not r["nan_params"], case
            assert len(r["warnings"]) == 1, f"{case}: {r['warnings']}"
            msg = r["warnings"][0]
            assert "step 2 skipped on every rank" in msg, msg
            here = "this rank's gradients" if rank == world_size - 1 else "another rank's gradients"
            assert here in msg, msg


# --- one process ------------------------------------------------------------------------------


def _model(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(n, generator=g)) for n in (5, 7, 3)]


def _set(params: list[torch.nn.Parameter], seed: int, scale: float = 1.0) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * scale


@pytest.mark.parametrize("make_opt", [
    lambda ps: torch.optim.AdamW(ps, **HP),
    lambda ps: AdamOptimizer(ps, decoupled_weight_decay=True, **HP),
    lambda ps: AdamOffloadOptimizer(ps, decoupled_weight_decay=True, **HP),
], ids=["torch.AdamW", "AdamOptimizer", "AdamOffloadOptimizer"])
def test_single_process_skip_and_reference(make_opt: Any) -> None:
    ps, ref = _model(), _model()
    m = OptimManager()
    opt = make_opt(ps)
    m.add_optimizer(opt)
    ref_opt = torch.optim.AdamW(ref, **HP)  # type: ignore[arg-type]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for t in range(1, 5):
            _set(ps, t)
            _set(ref, t)
            if t == 2:
                ps[1].grad[3] = float("-inf")  # type: ignore[index]
                before = _snapshot(m, ps)
                assert not m.step()
                _assert_same(before, _snapshot(m, ps), "skipped step")
                continue
            assert m.step()
            ref_opt.step()
            for p, r in zip(ps, ref, strict=True):
                torch.testing.assert_close(p.detach(), r.detach(), **TOL)
    assert [str(w.message)[:40] for w in caught if w.category is NonFiniteGradientWarning] == [
        "OptimManager: step 2 skipped on every ra"]
    assert m.skipped_steps == 1 and m.step_count == 4


def test_warning_is_rate_limited() -> None:
    ps = _model()
    m = OptimManager()
    m.add_optimizer(torch.optim.SGD(ps, lr=0.1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(12):
            _set(ps, 0)
            ps[0].grad[0] = float("nan")  # type: ignore[index]
            assert not m.step()
    msgs = [str(w.message) for w in caught if w.category is NonFiniteGradientWarning]
    assert len(msgs) == 2 and "step 1 skipped" in msgs[0] and "step 10 skipped" in msgs[1], msgs
    assert m.skipped_steps == 12


def test_clip_grad_norm_with_nonfinite_norm_does_not_touch_grads() -> None:
    """zero_grad, backward, clip_grad_norm, step: an inf/nan norm leaves the gradients as they
    were (no nan/zero scaling) and the step is skipped; opted out, 1.0.1's clip applies."""
    for bad, name in ((float("inf"), "an inf gradient"), (float("nan"), "a nan gradient"), (None, "a norm that overflows")):
        ps = _model()
        m = OptimManager()
        m.add_optimizer(torch.optim.SGD(ps, lr=0.1))
        _set(ps, 1, scale=1e30 if bad is None else 1.0)  # 1e30**2 overflows fp32: norm inf, grads finite
        if bad is not None:
            ps[2].grad[0] = bad  # type: ignore[index]
        grads = [p.grad.clone() for p in ps]  # type: ignore[union-attr]
        before = [p.detach().clone() for p in ps]
        norm = m.clip_grad_norm([{"params": ps}], max_norm=1.0)
        assert not torch.isfinite(norm), name
        for p, g in zip(ps, grads, strict=True):
            assert torch.equal(p.grad.nan_to_num(), g.nan_to_num()), f"{name}: clip changed the gradients"  # type: ignore[union-attr]
        with pytest.warns(NonFiniteGradientWarning, match="step 1 skipped"):
            assert not m.step(), name
        assert all(torch.equal(p, b) for p, b in zip(ps, before, strict=True)), name
        # the flag lives for one step only: a clean step afterwards is taken
        _set(ps, 2)
        m.clip_grad_norm([{"params": ps}], max_norm=1.0)
        assert m.step(), name
    ps = _model()
    m = OptimManager(skip_nonfinite=False)
    m.add_optimizer(torch.optim.SGD(ps, lr=0.1))
    _set(ps, 1)
    ps[0].grad[0] = float("inf")  # type: ignore[index]
    m.clip_grad_norm([{"params": ps}], max_norm=1.0)
    # 1.0.1's clip: coef 0, so the inf became nan and every other gradient zero
    assert ps[0].grad.isnan().any() and not any(p.grad.any() for p in ps[1:])  # type: ignore[union-attr]
    assert m.step()


def test_loss_scale_path_counts_but_does_not_warn() -> None:
    ps = _model()
    m = OptimManager(loss_scale=1024)
    m.add_optimizer(torch.optim.SGD(ps, lr=0.1))
    _set(ps, 1, scale=1024)
    ps[0].grad[0] = float("nan")  # type: ignore[index]
    with warnings.catch_warnings():
        warnings.simplefilter("error", NonFiniteGradientWarning)
        assert not m.step()
    assert (m.loss_scale, m.skipped_steps, m.step_count) == (512, 1, 1)


def test_state_dict_round_trip_and_old_dicts() -> None:
    ps = _model()
    m = OptimManager()
    opt = torch.optim.AdamW(ps, lr=0.1)
    m.add_optimizer(opt, Linear(opt, start_lr=0.1, warmup_iter=1, end_iter=10))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonFiniteGradientWarning)
        for t in range(4):
            _set(ps, t)
            if t in (1, 2):
                ps[0].grad[0] = float("nan")  # type: ignore[index]
            m.step()
    sd = m.state_dict()
    assert (sd["skipped_steps"], sd["step_count"]) == (2, 4)
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    ps2 = _model(1)
    opt2 = torch.optim.AdamW(ps2, lr=0.1)
    m2 = OptimManager()
    m2.add_optimizer(opt2, Linear(opt2, start_lr=0.1, warmup_iter=1, end_iter=10))
    m2.load_state_dict(torch.load(buf))
    assert (m2.skipped_steps, m2.step_count) == (2, 4)
    assert opt2.state_dict()["state"][0]["step"] == 2  # two steps taken
    old = {k: v for k, v in sd.items() if k not in ("skipped_steps", "step_count")}  # 1.0.1's keys
    m3 = OptimManager()
    opt3 = torch.optim.AdamW(_model(2), lr=0.1)
    m3.add_optimizer(opt3, Linear(opt3, start_lr=0.1, warmup_iter=1, end_iter=10))
    m3.load_state_dict(old)
    assert (m3.skipped_steps, m3.step_count) == (0, 0)


# --- the fused check itself ------------------------------------------------------------------


def _check_many() -> None:
    """One launch per dtype over tensors of any size and place (views of one buffer among them)."""
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        big = torch.randn(150_000).to(dtype)
        ts = [big[5:70_000], torch.randn(3).to(dtype), big[100_000:], torch.randn(65_536 + 1).to(dtype),
              torch.empty(0, dtype=dtype), torch.ones(4, 3, dtype=dtype).t()]  # empty, non-contiguous
        assert check_inf_nan_many_(ts, new_flag("cpu")).item() == 0, dtype
        for i, pos, bad in ((0, 0, float("nan")), (0, -1, float("inf")), (1, 1, float("-inf")),
                            (2, 30_000, float("nan")), (3, -1, float("inf")), (5, 1, float("nan"))):
            t = ts[i]
            if i == 5:
                t = t.t()  # write through the original layout
            old = t.reshape(-1)[pos].clone()
            t.reshape(-1)[pos] = bad
            assert check_inf_nan_many_(ts, new_flag("cpu")).item() == 1, (dtype, i, pos)
            t.reshape(-1)[pos] = old
        big[80_000] = float("nan")  # in the buffer, outside every tensor checked
        assert check_inf_nan_many_(ts, new_flag("cpu")).item() == 0, dtype


def interpreted_many() -> None:
    from bmt_optim._triton_support import Backend, backend_for

    assert backend_for(torch.ones(1)) is Backend.TRITON
    _check_many()
    print("ok")


def test_check_many_torch_path() -> None:
    _check_many()
    with pytest.raises(ValueError, match="flag is on"):
        check_inf_nan_many_([torch.ones(2)], new_flag("meta"))


@needs_triton
def test_check_many_triton_kernel_interpreted() -> None:
    assert "ok" in run_interpreted("tests.optim.test_nonfinite_guard", "interpreted_many")
