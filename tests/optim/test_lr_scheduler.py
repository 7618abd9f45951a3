"""Schedulers against the formulas of BMTrain 1.0.1 (with its three bugs fixed), no process group."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from bmt_optim.lr_scheduler import Cosine, Exponential, Linear, Noam, NoDecay, WarmupLRScheduler

S = 0.3  # start_lr


def _expected(kind: str, n: int, w: int, e: int, gamma: float = 0.95) -> float:
    """The reference table; where it divides by zero or climbs back, the documented fix."""
    if n < w:
        return S / math.sqrt(w) * n / w if kind == "noam" else S * n / w
    if kind == "nodecay":
        return S
    if kind == "noam":
        return S / math.sqrt(max(n, 1))  # fix: n = w = 0
    if kind == "exponential":
        return max(0.0, S * gamma ** (n - w))
    span = max(1, e - w)
    n_c = min(n, w + span)  # fix: clamp past end_iter (the formula would climb back for cosine)
    if kind == "linear":
        return max(0.0, S * (w + span - n_c) / span)
    return max(0.0, S * 0.5 * (1 + math.cos(math.pi * (n_c - w) / span)))


_CLASSES: dict[str, Callable[..., WarmupLRScheduler]] = {
    "nodecay": NoDecay,
    "noam": Noam,
    "linear": Linear,
    "cosine": Cosine,
    "exponential": Exponential,
}


def _opt() -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))], lr=123.0)


@pytest.mark.parametrize("kind", sorted(_CLASSES))
@pytest.mark.parametrize(("w", "e"), [(0, 0), (0, 40), (1, 1), (10, 60), (10, 5), (7, 8)])
def test_schedule_matches_formula(kind: str, w: int, e: int) -> None:
    opt = _opt()
    sched = _CLASSES[kind](opt, start_lr=S, warmup_iter=w, end_iter=e, num_iter=0)
    for n in range(0, max(e, w) + 40):
        if n:
            sched.step()
        want = _expected(kind, n, w, e)
        assert sched.num_iter == n
        assert sched.current_lr == pytest.approx(want, rel=1e-12, abs=1e-15), (kind, w, e, n)
        assert sched.get_lr() == sched.current_lr
        assert all(g["lr"] == sched.current_lr for g in opt.param_groups)


@pytest.mark.parametrize("kind", sorted(_CLASSES))
def test_construction_sets_lr_at_any_num_iter(kind: str) -> None:
    # the reference's Exponential read gamma before setting it when built past warm-up
    for n in (0, 5, 10, 11, 100):
        opt = _opt()
        sched = _CLASSES[kind](opt, start_lr=S, warmup_iter=10, end_iter=50, num_iter=n)
        assert opt.param_groups[0]["lr"] == pytest.approx(_expected(kind, n, 10, 50))
        assert sched.current_lr == opt.param_groups[0]["lr"]


def test_cosine_stays_at_zero_past_end_and_never_rises_after_warmup() -> None:
    sched = Cosine(_opt(), start_lr=S, warmup_iter=5, end_iter=25)
    lrs = []
    for _ in range(100):
        sched.step()
        lrs.append(sched.current_lr)
    decay = lrs[4:]
    assert all(b <= a for a, b in zip(decay, decay[1:], strict=False))
    assert all(lr == 0.0 for lr in lrs[24:])


def test_noam_without_warmup_has_no_division_by_zero() -> None:
    sched = Noam(_opt(), start_lr=S, warmup_iter=0, end_iter=0, num_iter=0)
    assert sched.current_lr == S
    sched.step()
    assert sched.current_lr == S
    sched.step()
    assert sched.current_lr == pytest.approx(S / math.sqrt(2))


def test_exponential_gamma() -> None:
    sched = Exponential(_opt(), start_lr=S, warmup_iter=2, end_iter=0, num_iter=0, gamma=0.5)
    assert [sched.current_lr] + [(sched.step(), sched.current_lr)[1] for _ in range(4)] == pytest.approx(
        [0.0, S / 2, S, S / 2, S / 4]
    )
    with pytest.raises(ValueError, match="gamma"):
        Exponential(_opt(), start_lr=S, warmup_iter=2, end_iter=0, num_iter=0, gamma=0.0)


@pytest.mark.parametrize("kind", sorted(_CLASSES))
def test_state_dict_round_trip(kind: str) -> None:
    a = _CLASSES[kind](_opt(), start_lr=S, warmup_iter=4, end_iter=30)
    for _ in range(13):
        a.step()
    sd = a.state_dict()
    assert {"start_lr", "warmup_iter", "end_iter", "num_iter"} <= set(sd)
    opt_b = _opt()
    b = _CLASSES[kind](opt_b, start_lr=1.0, warmup_iter=1, end_iter=2)
    b.load_state_dict(sd)
    assert (b.num_iter, b.current_lr, opt_b.param_groups[0]["lr"]) == (13, a.current_lr, a.current_lr)
    for _ in range(20):
        a.step()
        b.step()
        assert b.current_lr == a.current_lr


def test_exponential_state_keeps_gamma_and_loads_reference_dicts_without_it() -> None:
    a = Exponential(_opt(), start_lr=S, warmup_iter=0, end_iter=0, gamma=0.5)
    b = Exponential(_opt(), start_lr=S, warmup_iter=0, end_iter=0, gamma=0.9)
    b.load_state_dict(a.state_dict())
    assert b.gamma == 0.5
    ref_sd = {"start_lr": S, "warmup_iter": 0, "end_iter": 0, "num_iter": 3}  # BMTrain's keys only
    b.load_state_dict(ref_sd)
    assert b.current_lr == pytest.approx(S * 0.5**3)


def test_step_to_a_given_iteration_and_bad_input() -> None:
    sched = Linear(_opt(), start_lr=S, warmup_iter=10, end_iter=20)
    sched.step(15)
    assert sched.current_lr == pytest.approx(S / 2)
    with pytest.raises(ValueError, match="num_iter"):
        sched.step(-1)
    with pytest.raises(ValueError, match="warmup_iter"):
        Linear(_opt(), start_lr=S, warmup_iter=-1, end_iter=20)
    with pytest.raises(ValueError, match="start_lr"):
        Linear(_opt(), start_lr=-1.0, warmup_iter=1, end_iter=20)
    with pytest.raises(NotImplementedError, match="get_lr_decay"):
        WarmupLRScheduler(_opt(), start_lr=S, warmup_iter=0, end_iter=0)
