"""OptimManager: loss scaling, overflow skipping on every rank, clipping, schedulers, checkpoints."""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from typing import Any

import bmt_comm
import pytest
import torch
from bmt_optim import OptimManager
from bmt_optim.lr_scheduler import Linear, NoDecay


class ScaledSGD(torch.optim.Optimizer):
    """Stand-in for BMTrain's optimizers: takes the loss scale and unscales inside step()."""

    _bmtrain_optimizer = True

    def __init__(self, params: Any, lr: float = 0.1) -> None:
        super().__init__(params, {"lr": lr})
        self.justified: list[tuple[float, float]] = []
        self.scales: list[float] = []
        self.gathered: list[bool] = []

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None, scale: float = 1.0) -> None:  # type: ignore[override]
        self.scales.append(scale)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-group["lr"] / scale)

    def _on_justify_scale(self, old: float, new: float) -> None:
        self.justified.append((old, new))

    def state_dict(self, gather: bool = False) -> dict[str, Any]:  # type: ignore[override]
        self.gathered.append(gather)
        return super().state_dict()


def _params(n: int = 3, seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(4 + i, generator=g)) for i in range(n)]


def _set_grads(params: list[torch.nn.Parameter], scale: float, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    grads = [torch.randn(p.shape, generator=g) for p in params]
    for p, gr in zip(params, grads, strict=True):
        p.grad = gr * scale
    return grads


# --- one process, no init_distributed ----------------------------------------------------


def test_defaults_without_init() -> None:
    m = OptimManager()
    assert (m.loss_scale, m.loss_scale_enabled, m.grad_scale, m.steps_since_last_scale) == (1.0, False, 1, 0)
    m = OptimManager(loss_scale=8, loss_scale_factor=0.5, grad_scale=4)
    assert m.loss_scale_factor == 2.0  # < 1 is inverted, as in the reference
    assert m.scale_loss(torch.tensor(3.0)).item() == 6.0


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="min_loss_scale"):
        OptimManager(loss_scale=8, min_loss_scale=0)
    with pytest.raises(ValueError, match=r"loss_scale \(0.5\) must lie in"):
        OptimManager(loss_scale=0.5)
    with pytest.raises(ValueError, match="loss_scale_factor"):
        OptimManager(loss_scale=8, loss_scale_factor=1)
    with pytest.raises(ValueError, match="loss_scale_steps"):
        OptimManager(loss_scale=8, loss_scale_steps=0)
    with pytest.raises(ValueError, match="norm_type"):
        OptimManager().clip_grad_norm([{"params": _params()}], 1.0, norm_type=0)


def test_backward_scales_and_step_unscales_for_torch_and_bmt_optimizers() -> None:
    a, b = _params(seed=0), _params(seed=0)
    ref = _params(seed=0)
    m = OptimManager(loss_scale=64, grad_scale=2)
    sgd, ours = torch.optim.SGD(a, lr=0.1), ScaledSGD(b, lr=0.1)
    m.add_optimizer(sgd)
    m.add_optimizer(ours)
    ref_opt = torch.optim.SGD(ref, lr=0.1)
    for _ in range(3):
        m.zero_grad()
        ref_opt.zero_grad()
        m.backward(sum((p**2).sum() for p in a + b))
        assert a[0].grad is not None
        torch.testing.assert_close(a[0].grad, 2 * a[0].detach() * 32)  # loss * 64 / 2
        (sum((p**2).sum() for p in ref) / 2).backward()
        assert m.step()
        ref_opt.step()
        for x, y, r in zip(a, b, ref, strict=True):
            torch.testing.assert_close(x, r)
            torch.testing.assert_close(y, r)
    assert ours.scales == [64.0] * 3


def test_disabled_scaling_leaves_grads_alone() -> None:
    p = _params()
    m = OptimManager(skip_nonfinite=False)
    sgd = torch.optim.SGD(p, lr=0.0)
    m.add_optimizer(sgd)
    grads = _set_grads(p, 1.0)
    grads[0][0] = float("inf")  # opted out of the guard: no check when scaling is off (1.0.1)
    p[0].grad = grads[0].clone()
    assert m.step()
    assert torch.equal(p[1].grad, grads[1])


def test_overflow_skips_step_shrinks_scale_and_zeroes_grads() -> None:
    p = _params()
    m = OptimManager(loss_scale=1024, loss_scale_steps=3)
    opt = ScaledSGD(p)
    sched = NoDecay(opt, start_lr=0.1, warmup_iter=10, end_iter=0)
    m.add_optimizer(opt, sched)
    before = [q.detach().clone() for q in p]
    _set_grads(p, 1024)
    assert p[2].grad is not None and p[2].grad.dtype == torch.float32
    p[2].grad[1] = float("nan")  # an fp32 gradient: the reference did not check those
    grad_buffers = [q.grad for q in p]
    assert not m.step()
    assert m.loss_scale == 512 and opt.justified == [(1024.0, 512.0)]
    assert sched.num_iter == 0 and opt.scales == []
    assert all(torch.equal(q, b) for q, b in zip(p, before, strict=True))
    assert all(q.grad is g and not q.grad.any() for q, g in zip(p, grad_buffers, strict=True))  # zeroed in place


def test_scale_grows_after_clean_steps_and_is_clamped() -> None:
    p = _params()
    m = OptimManager(loss_scale=4, loss_scale_steps=2, min_loss_scale=2, max_loss_scale=12)
    opt = ScaledSGD(p, lr=0.0)
    m.add_optimizer(opt)
    scales = []
    for step in range(8):
        _set_grads(p, m.loss_scale)
        if step in (5, 6):
            assert p[0].grad is not None
            p[0].grad[0] = float("inf")
        m.step()
        scales.append(m.loss_scale)
    # 4 -> 8 after two steps -> 12 (clamped, not 16) -> stays; overflows: 6, then 3
    assert scales == [4, 8, 8, 12, 12, 6, 3, 3]
    assert opt.justified == [(4, 8), (8, 12), (12, 6), (6, 3)]
    m2 = OptimManager(loss_scale=2, min_loss_scale=2)
    m2.add_optimizer(ScaledSGD(p))
    p[0].grad[0] = float("inf")  # type: ignore[index]
    assert not m2.step()
    assert m2.loss_scale == 2  # clamped at the minimum


@pytest.mark.parametrize("norm_type", [2, 1, 3.5, "inf", math.inf])
def test_clip_grad_norm_matches_torch(norm_type: float | str) -> None:
    p, ref = _params(4), _params(4)
    scale = 256.0
    grads = _set_grads(p, scale)
    _set_grads(ref, 1.0)
    m = OptimManager(loss_scale=scale)
    m.add_optimizer(torch.optim.SGD(p, lr=0.1))
    want = torch.nn.utils.clip_grad_norm_(ref, max_norm=1.0, norm_type=float(norm_type))
    norm = m.clip_grad_norm([{"params": p}], max_norm=1.0, norm_type=norm_type)
    torch.testing.assert_close(norm, want)
    assert norm > 1.0  # so the gradients were clipped
    for q, r in zip(p, ref, strict=True):
        assert q.grad is not None and r.grad is not None
        torch.testing.assert_close(q.grad / scale, r.grad)
    p[0].grad = None  # a missing gradient counts as zero
    big = m.clip_grad_norm([{"params": p}], max_norm=1e9, norm_type=norm_type)
    want = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads[1:]]), float(norm_type))
    assert p[1].grad is not None
    torch.testing.assert_close(big * scale, torch.linalg.vector_norm(
        torch.cat([q.grad.flatten() for q in p[1:] if q.grad is not None]), float(norm_type)))


def _train(m: OptimManager, params: list[list[torch.nn.Parameter]], steps: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        m.zero_grad()
        loss = sum(((q - torch.randn(q.shape, generator=g)) ** 2).sum() for ps in params for q in ps)
        m.backward(loss)
        m.step()


def _make(seed: int) -> tuple[OptimManager, list[list[torch.nn.Parameter]], ScaledSGD]:
    ps = [_params(2, seed), _params(2, seed + 1), _params(2, seed + 2)]
    m = OptimManager(loss_scale=2**10, loss_scale_steps=3)
    adam = torch.optim.AdamW(ps[0], lr=0.01)
    m.add_optimizer(adam, Linear(adam, start_lr=0.01, warmup_iter=2, end_iter=20))
    sgd = torch.optim.SGD(ps[1], lr=0.05, momentum=0.9)
    m.add_optimizer(sgd)  # no scheduler
    ours = ScaledSGD(ps[2])
    m.add_optimizer(ours, NoDecay(ours, start_lr=0.1, warmup_iter=4, end_iter=0))
    return m, ps, ours


def test_state_dict_round_trip() -> None:
    m, ps, ours = _make(0)
    _train(m, ps, 4, seed=10)
    sd = m.state_dict(gather_opt=True)
    assert ours.gathered == [True]  # asked for the whole state; AdamW and SGD get a plain call
    assert sd["lr_schedulers"][1] is None
    assert (sd["loss_scale"], sd["steps_since_last_scale"]) == (2048.0, 1)

    m2, ps2, _ = _make(100)
    for a, b in zip(ps, ps2, strict=True):
        for x, y in zip(a, b, strict=True):
            y.data.copy_(x.data)
    buf = io.BytesIO()  # through bytes, as a checkpoint file: torch's state dicts alias live state
    torch.save(sd, buf)
    buf.seek(0)
    m2.load_state_dict(torch.load(buf))
    assert (m2.loss_scale, m2.loss_scale_enabled, m2.steps_since_last_scale) == (2048.0, True, 1)
    _train(m, ps, 5, seed=20)
    _train(m2, ps2, 5, seed=20)
    for a, b in zip(ps, ps2, strict=True):
        for x, y in zip(a, b, strict=True):
            torch.testing.assert_close(x, y, rtol=0, atol=0)
    assert m2.loss_scale == m.loss_scale


def test_load_state_dict_mismatch() -> None:
    m, _, _ = _make(0)
    sd = m.state_dict()
    m_short = OptimManager(loss_scale=8)
    with pytest.raises(ValueError, match="holds 3 optimizers"):
        m_short.load_state_dict(sd)
    sd["lr_schedulers"][1] = {"num_iter": 0}
    with pytest.raises(ValueError, match="optimizer 1 has no scheduler"):
        m.load_state_dict(sd)


# --- several ranks --------------------------------------------------------------------------


def _dist_worker() -> list[float]:
    """``bmt_comm.Shard``s cover full tensors over the world; plain parameters are
    replicated on every rank of a pipeline stage (and differ between stages)."""
    ctx = bmt_comm.get_context()
    rank, world, stages, stage = ctx.rank, ctx.world_size, ctx.topology.pipe_size, ctx.topology.stage_id
    scale = 2.0**12
    g = torch.Generator().manual_seed(5)
    full_shards = [torch.randn(world * n, generator=g) for n in (3, 5)]
    full_plain = [[torch.randn(4, generator=g), torch.randn(2, generator=g).half()] for _ in range(stages)]

    params: list[torch.nn.Parameter] = []
    for f in full_shards:
        n = f.numel() // world
        p = torch.nn.Parameter(torch.zeros(n))
        params.append(bmt_comm.mark_shard(p, rank * n, (rank + 1) * n, world * n, ctx.comms.world))
    params += [torch.nn.Parameter(torch.zeros_like(f)) for f in full_plain[stage]]
    locals_ = [f[rank * f.numel() // world : (rank + 1) * f.numel() // world] for f in full_shards]
    mine = locals_ + full_plain[stage]
    everything = torch.cat([f.float() for f in full_shards + [t for s in full_plain for t in s]])

    m = OptimManager(loss_scale=scale)
    assert m.grad_scale == world // stages, m.grad_scale
    opt = ScaledSGD(params, lr=0.5)
    m.add_optimizer(opt)

    def reset() -> None:
        for p, t in zip(params, mine, strict=True):
            p.grad = (t * scale).to(p.dtype)

    for norm_type in (2, 1, 3.0, "inf"):
        reset()
        want = torch.linalg.vector_norm(everything, float(norm_type))
        norm = m.clip_grad_norm(opt.param_groups, max_norm=1e6, norm_type=norm_type)
        torch.testing.assert_close(norm, want, rtol=1e-5, atol=0, msg=lambda s, p=norm_type: f"p={p}: {s}")
    reset()
    norm = m.clip_grad_norm(opt.param_groups, max_norm=float(want) / 4, norm_type="inf")
    for p, t in zip(params, mine, strict=True):
        assert p.grad is not None
        torch.testing.assert_close(p.grad.float() / scale, t.float() / 4, rtol=2e-3, atol=1e-6)

    scales = []
    for step, (bad_rank, bad_param) in enumerate([(world - 1, 0), (None, 0), (0, 3), (None, 0)]):
        reset()
        before = [p.detach().clone() for p in params]
        if rank == bad_rank:
            assert params[bad_param].grad is not None
            params[bad_param].grad[0] = float("inf") if step == 0 else float("nan")  # type: ignore[index]
        stepped = m.step()
        assert stepped == (bad_rank is None), (step, stepped)
        changed = [not torch.equal(p, b) for p, b in zip(params, before, strict=True)]
        assert all(changed) if stepped else not any(changed), (step, changed)
        if not stepped:
            assert all(p.grad is not None and not p.grad.any() for p in params)
        scales.append(m.loss_scale)
    return scales


@pytest.mark.parametrize(
    ("world_size", "init"), [(2, {}), (4, {"pipe_size": 2, "tp_size": 2})]
)
def test_distributed_overflow_and_grad_norm(spawn: Any, world_size: int, init: dict[str, int]) -> None:
    s = 2.0**12
    assert spawn(_dist_worker, **init) == [[s / 2, s / 2, s / 4, s / 4]] * world_size


def test_zero_grad_zeroes_in_place_and_drops_on_request() -> None:
    """1.0.1 zeroes the gradients in place (the tensors stay); ``set_to_none=True`` drops them."""
    params = _params(seed=0)
    m = OptimManager()
    m.add_optimizer(torch.optim.SGD(params, lr=0.1))
    m.backward(sum((p**2).sum() for p in params))
    grads = [p.grad for p in params]
    m.zero_grad()
    assert all(p.grad is g and g is not None and not g.any() for p, g in zip(params, grads, strict=True))
    m.backward(sum((p**2).sum() for p in params))
    m.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in params)
