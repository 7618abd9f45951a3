"""``OptimManager.update_during_backward()`` with a guard, a loss scale or clipping.

The Blocks' gradients are checked (inf/nan, their part of the 2-norm) as they arrive during the
backward, and every update starts at ``step()``. Each run is compared with the default offload
step (no ``update_during_backward``) on the same data:

- without clipping, bit-identical: a nan step skipped on every rank, a loss-scaled step that
  overflows (skipped, scale halved), a Block gradient edited in place after the backward (read
  again at the step), with ``overlap_forward`` (the Blocks' updates pending after ``step()``);
- with clipping, the norm equals the default's (rtol 1e-6 on the first step), the device
  gradients are left unclipped, and the fp32 masters agree to the rounding of the clipped
  gradient (the default rounds it to the parameter dtype, the checked step scales in fp32):
  atol 1e-6 after every fp32 step, 1e-5 after the first bf16 step.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from .models import Config, batch, causal_mask, rows
from .test_offload_overlap import LR, _assert_identical, _build, _check_queue_used, _device, _final_state

STEPS = 4
NAN_STEP = 1


def _run(dtype: torch.dtype, plain_head: bool, mode: str, checked: bool, lazy: bool, spec: float = 0.0) -> dict[str, Any]:
    """Train ``STEPS`` steps of two micro-batches; ``checked``: the last backward of each step runs
    inside ``update_during_backward()`` (``spec``: with that ``speculative_fraction``). Returns the
    final state, the norms, what was taken and, per step, the elements speculated (started, kept,
    undone)."""
    import bmt_comm
    from bmt_optim import AdamOffloadOptimizer, OptimManager

    cfg = Config()
    rank, world = bmt_comm.rank(), bmt_comm.world_size()
    mask = causal_mask(cfg.seq).to(_device())
    model = _build(cfg, dtype, plain_head)
    opt = AdamOffloadOptimizer(model.parameters(), lr=LR, weight_decay=0.1, chunk_numel=100, num_threads=2,
                               overlap=checked, overlap_forward=checked and lazy, speculative_fraction=spec)
    manager = OptimManager(loss_scale=1024.0 if mode == "scale" else None)
    manager.add_optimizer(opt)
    block_params = list(model.blocks.parameters()) + ([] if plain_head else list(model.head.parameters()))
    taken, norms, scales, speculated = [], [], [], []
    for step in range(STEPS):
        counted = (opt.speculation.started, opt.speculation.kept, opt.speculation.undone)
        x, target = batch(cfg, 4 * world, seed=90 + step)
        x, target = rows(x, rank, world).to(_device()), rows(target, rank, world).to(_device())
        if step == NAN_STEP and rank == world - 1:
            x = x.clone()
            x[0, 0, 0] = float("nan")  # on one rank only: every rank skips
        chunks = list(zip(x.chunk(2), target.chunk(2), strict=True))
        for k, (xb, tb) in enumerate(chunks):
            loss = ((model(xb.to(dtype), mask).float() - tb) ** 2).mean()
            if checked and lazy:
                assert not opt._lazy, f"step {step}: a Block's update did not land in the forward that read it"
            if checked and k == len(chunks) - 1:
                with manager.update_during_backward():
                    manager.backward(loss)
                eager = opt._eager
                assert eager is not None and eager.checks is not None and not eager.done, "an update started in backward"
                checked_ids = {id(p) for r in eager.checks.records for p in r.params}
                assert {id(p) for p in block_params} <= checked_ids, f"step {step}: a Block's gradients were not checked"
            else:
                manager.backward(loss)
        if mode == "edit" and step == 2:
            next(model.blocks.parameters()).grad.mul_(3)  # after its check and copy: read again at the step
        if mode == "state" and step == 2:
            opt.state_dict()  # between the backward and the step: a speculative update is undone (redone at the step)
        if mode == "clip" and step != NAN_STEP:
            before = [p.grad.clone() for p in block_params] if checked else []
            norms.append(manager.clip_grad_norm(opt.param_groups, max_norm=0.05).item())
            if step == STEPS - 1:  # a second clip composes with the first
                norms.append(manager.clip_grad_norm(opt.param_groups, max_norm=0.02).item())
            for p, g in zip(block_params if checked else [], before, strict=True):
                assert torch.equal(p.grad, g), "a checked step's clip changed a device gradient"
        taken.append(manager.step())
        scales.append(manager.loss_scale)
        now = (opt.speculation.started, opt.speculation.kept, opt.speculation.undone)
        speculated.append(tuple(b - a for a, b in zip(counted, now, strict=True)))
        if checked and lazy and taken[-1] and not (mode == "edit" and step == 2):  # (edited: updated in step())
            assert set(opt._lazy) == {id(p) for p in block_params}, f"step {step}: not every Block's update is pending"
        if step == 0:
            first = _masters(opt)  # (lands the updates in flight)
        manager.zero_grad(set_to_none=step == 2)
    state = _final_state(model, opt)
    if checked:
        assert not opt._lazy
        _check_queue_used(opt, dtype)
    return {"state": state, "norms": norms, "taken": taken, "scales": scales, "first": first, "masters": _masters(opt),
            "speculated": speculated}


def _masters(opt: Any) -> dict[int, torch.Tensor]:
    return {i: s["_param_fp32"].clone() for i, s in opt.state_dict()["state"].items() if "_param_fp32" in s}


def _checked_matches_default(dtype_name: str, plain_head: bool, mode: str, lazy: bool = False, spec: float = 0.0) -> None:
    dtype = getattr(torch, dtype_name)
    default = _run(dtype, plain_head, mode, checked=False, lazy=False)
    checked = _run(dtype, plain_head, mode, checked=True, lazy=lazy, spec=spec)
    if spec:
        _check_speculated(checked["speculated"], mode, spec, dtype)
    want = [step != NAN_STEP for step in range(STEPS)]
    assert default["taken"] == checked["taken"] == want, (default["taken"], checked["taken"])
    assert default["scales"] == checked["scales"], (default["scales"], checked["scales"])
    if mode == "scale":
        assert checked["scales"][NAN_STEP] == 512.0, checked["scales"]
    what = f"{dtype_name}, {mode}{', overlap_forward' if lazy else ''}"
    if mode != "clip":
        _assert_identical(default["state"], checked["state"], what)
        return
    a, b = default["norms"], checked["norms"]
    assert len(a) == len(b) == STEPS, (a, b)
    torch.testing.assert_close(b[0], a[0], rtol=1e-6, atol=0.0)  # the same gradients: only the sum's order differs
    torch.testing.assert_close(b, a, rtol=1e-2, atol=0.0)  # later: parameters that differ by the clip's rounding
    assert b[-2] > 0.05 and abs(b[-1] - 0.05) < 1e-4, b  # the second clip saw the gradients times the first's factor
    # the first step: the same gradients; fp32 (all steps): the two roundings of the clipped
    # gradient, in fp32. After a bf16 step the bf16 parameters may differ by an ulp, and Adam's
    # sign-like update of a gradient near zero amplifies that: later bf16 steps are not compared
    # elementwise (the norms above are).
    # (a thousandth of a step, lr 1e-2: Adam's eps makes the first update of a tiny gradient
    # depend on its rounding)
    compared = [("first", 1e-5)] + ([("masters", 1e-6)] if dtype == torch.float32 else [])
    for key, atol in compared:
        for i, m in default[key].items():
            torch.testing.assert_close(checked[key][i], m, rtol=0.0, atol=atol, msg=lambda s, i=i, k=key: f"{what}: {k} master {i}: {s}")


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
@pytest.mark.parametrize("mode", ["guard", "scale", "edit"])
def test_checked_backward_is_exact(spawn: Any, world_size: int, dtype_name: str, mode: str) -> None:
    """In place (a group of one, plain head outside Blocks) and sharded (the head a Block too)."""
    spawn(_checked_matches_default, dtype_name, world_size == 1, mode)


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_checked_backward_clips_inside_the_update(spawn: Any, world_size: int, dtype_name: str) -> None:
    spawn(_checked_matches_default, dtype_name, world_size == 1, "clip")


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("mode", ["guard", "clip"])
def test_checked_backward_with_overlap_forward(spawn: Any, world_size: int, mode: str) -> None:
    spawn(_checked_matches_default, "bfloat16", world_size == 1, mode, True)


def _checked_rules() -> None:
    from bmt_optim import AdamOffloadOptimizer, OptimManager

    cfg = Config()
    mask = causal_mask(cfg.seq).to(_device())
    model = _build(cfg, torch.float32, plain_head=True)
    x, target = (t.to(_device()) for t in batch(cfg, 2, seed=1))
    opt = AdamOffloadOptimizer(model.parameters(), overlap=True)
    manager = OptimManager(loss_scale=None, skip_nonfinite=False)
    manager.add_optimizer(opt)

    def backward(scale: float = 1.0) -> None:
        with manager.update_during_backward(defer=True):
            manager.backward(((model(x * scale, mask) - target) ** 2).mean())

    # a clip must cover all of a checked optimizer's parameters or none
    backward()
    with pytest.raises(ValueError, match=r"all of that optimizer's parameters with a gradient or none \(got 1 of"):
        manager.clip_grad_norm([{"params": [next(model.parameters())]}], max_norm=1.0)
    # defer=True: an unguarded manager may clip (nothing started during the backward)
    norm = manager.clip_grad_norm(opt.param_groups, max_norm=1e-3)
    assert norm.item() > 1e-3
    assert manager.step()
    manager.zero_grad()
    # an inf/nan norm on an unguarded manager: nothing is updated
    before = {k: v.clone() for k, v in model.state_dict().items()}
    backward(float("inf"))
    manager.clip_grad_norm(opt.param_groups, max_norm=1.0)
    with pytest.raises(RuntimeError, match=r"gave the clip factor .* on an unguarded manager: nothing was updated"):
        manager.step()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed in a step that raised"
    manager.zero_grad()
    assert opt._eager is None


@pytest.mark.parametrize("world_size", [1])
def test_checked_backward_rules(spawn: Any, world_size: int) -> None:
    spawn(_checked_rules)


def _check_speculated(per_step: list[tuple[int, int, int]], mode: str, spec: float, dtype: torch.dtype) -> None:
    """What the speculative updates did, step by step: (elements started, kept, undone)."""
    from bmt_optim.cpu_adam import native_available

    if dtype == torch.float32 or not native_available():  # fp32: torch's Adam, never speculative
        assert all(s == (0, 0, 0) for s in per_step), per_step
        return
    for step, (started, kept, undone) in enumerate(per_step):
        assert started > 0 and kept + undone == started, (step, per_step)
        if step == NAN_STEP:
            assert kept == 0, f"step {step} was skipped but kept a speculative update: {per_step}"
        elif mode in ("guard", "scale"):
            assert undone == 0, f"step {step}: a speculative update was undone for nothing: {per_step}"
        elif mode in ("edit", "state") and step == 2:
            assert undone > 0, f"step {step}: the edited gradient's update was kept: {per_step}"
    if mode == "clip":  # max_norm 0.05: every step scales its gradients
        assert all(kept == 0 for s, (_, kept, _) in enumerate(per_step)), per_step


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("mode", ["guard", "scale", "edit", "state", "clip"])
def test_speculative_updates_are_exact(spawn: Any, world_size: int, mode: str) -> None:
    """``speculative_fraction=1``: every Block's update starts during the checked backward; a
    skipped step (nan on one rank, an overflow), an edited gradient, a state dict taken before the
    step or a clip undoes it, and the result is the default step's (bit for bit; a clip to its
    rounding, as without speculation)."""
    spawn(_checked_matches_default, "bfloat16", world_size == 1, mode, True, 1.0)


@pytest.mark.parametrize("world_size", [1])
def test_speculative_fraction_bounds_the_backup(spawn: Any, world_size: int) -> None:
    spawn(_partial_speculation)


def _partial_speculation() -> None:
    """A fraction: the last Blocks to arrive only; still exact."""
    from bmt_optim.cpu_adam import native_available

    _checked_matches_default("bfloat16", True, "guard", True, 0.4)
    if not native_available():
        return
    run = _run(torch.bfloat16, True, "guard", checked=True, lazy=True, spec=0.4)
    cfg = Config()
    total = sum(p.numel() for p in _build(cfg, torch.bfloat16, True).parameters())
    for started, _, _ in run["speculated"]:
        assert 0 < started <= 0.4 * total, (started, total)


def test_speculative_fraction_rules() -> None:
    from bmt_optim import AdamOffloadOptimizer

    p = [torch.nn.Parameter(torch.zeros(4))]
    with pytest.raises(ValueError, match=r"speculative_fraction=0.5 needs overlap_forward=True"):
        AdamOffloadOptimizer(p, overlap=True, speculative_fraction=0.5)
    for bad in (-0.1, 1.5, "1"):
        with pytest.raises(ValueError, match=r"speculative_fraction must be in \[0, 1\]"):
            AdamOffloadOptimizer(p, overlap_forward=True, speculative_fraction=bad)  # type: ignore[arg-type]
