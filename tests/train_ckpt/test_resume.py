"""Resume from a training checkpoint on gloo, through new process groups.

Same world size: the losses of the steps after the resume and the final parameters equal an
uninterrupted run bitwise (with dropout, AdamOptimizer and AdamOffloadOptimizer, a cosine
schedule, an OptimManager whose loss scale moves). Another world size: right after the load the
gathered model and optimizer state equal the saved ones bitwise (a re-cut only moves elements);
training on then differs from the uninterrupted run by summation order only (gradients are
reduced over another number of ranks): after 3 more Adam steps, parameters and moments within
rtol 1e-5 / atol 1e-6 and the loss within rtol 1e-6, except the attention key bias. Its true
gradient is 0 (softmax ignores it), so Adam turns rounding noise into steps of up to lr (1e-2):
it is held to atol 1e-3.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from ..harness import run_distributed
from ._training import Plan, assert_same, run

CPU = {"CUDA_VISIBLE_DEVICES": ""}


def _run(world: int, plan: Plan) -> list[dict]:
    return run_distributed(run, world, plan, env=CPU, timeout=180)


@pytest.mark.parametrize("optimizer", ["adam", "offload"])
def test_resume_at_the_same_world_size_is_bitwise(tmp_path: Path, optimizer: str) -> None:
    base = Plan(optimizer=optimizer, dropout=0.1, stop=6, snapshot_at=(6,))
    whole = _run(2, base)
    root = str(tmp_path / "ckpt")
    first = _run(2, replace(base, stop=3, root=root, save_at=(3,), snapshot_at=()))
    resumed = _run(2, replace(base, root=root, load=True))
    for rank in range(2):
        info = resumed[rank]["info"]
        assert (info.step, info.world_size, info.resharded) == (3, 2, False)
        assert info.extra == {"rank": rank}
        assert info.rng_restored == ("python", "numpy", "torch")
        assert first[rank]["losses"] == {s: whole[rank]["losses"][s] for s in (1, 2, 3)}
        assert resumed[rank]["losses"] == {s: whole[rank]["losses"][s] for s in (4, 5, 6)}, rank
        assert_same(resumed[rank]["shards"], whole[rank]["shards"], f"rank {rank} parameters")
    assert_same(resumed[0]["snapshots"][6], whole[0]["snapshots"][6], "model and optimizer after step 6")
    # the dropout masks differ from step to step: without the RNG the resumed steps would differ
    assert len(set(whole[0]["losses"].values())) == 6


def test_a_delayed_update_resumes_as_it_continues(tmp_path: Path) -> None:
    """``AdamOffloadOptimizer(delay_update=True)``: a checkpoint lands the update in flight, so the
    run that saved it and a run resumed from it go on alike, bitwise (losses, parameters, state)."""
    root = str(tmp_path / "ckpt")
    base = Plan(optimizer="offload", dropout=0.1, stop=6, snapshot_at=(6,), offload_options=(("delay_update", True),))
    continued = _run(2, replace(base, root=root, save_at=(3,)))
    resumed = _run(2, replace(base, root=root, load=True))
    for rank in range(2):
        assert resumed[rank]["losses"] == {s: continued[rank]["losses"][s] for s in (4, 5, 6)}, rank
        assert_same(resumed[rank]["shards"], continued[rank]["shards"], f"rank {rank} parameters")
    assert_same(resumed[0]["snapshots"][6], continued[0]["snapshots"][6], "model and optimizer after step 6")
    undelayed = _run(2, replace(base, offload_options=()))
    assert undelayed[0]["losses"][3] != continued[0]["losses"][3]  # the delay changes the numerics


def test_without_the_saved_rng_the_resume_differs(tmp_path: Path) -> None:
    """The bitwise test can fail: a resume that does not restore the RNG gives another loss."""
    root = str(tmp_path / "ckpt")
    whole = _run(2, Plan(stop=3, root=root, save_at=(2,)))
    skipped = run_distributed(_run_without_rng, 2, root, env=CPU, timeout=180)
    assert skipped[0][3] != whole[0]["losses"][3]


def _run_without_rng(root: str) -> dict[int, float]:
    import bmt_comm
    import torch.nn.functional as F
    from bmtrain import load_checkpoint

    from ..ckpt.models import Config, batch, rows
    from ._training import GLOBAL_BATCH, build

    plan = Plan()
    model, _, manager = build(plan)
    info = load_checkpoint(root, model, manager, load_rng=False)
    assert info is not None and info.rng_restored == ()
    ctx = bmt_comm.get_context()
    x, y = batch(Config(dim=16, heads=2, hidden=24, layers=2, seq=5), GLOBAL_BATCH, seed=100 + info.step)
    x, y = rows(x, ctx.rank, ctx.world_size), rows(y, ctx.rank, ctx.world_size)
    manager.zero_grad()
    loss = F.mse_loss(model(x), y)
    return {info.step + 1: loss.item()}


DIM = 16  # the model's width: qkv.bias[DIM:2 * DIM] is the key bias


def _close(a: dict, b: dict, what: str) -> None:
    for k in a:
        x, y = a[k].double().reshape(-1), b[k].double().reshape(-1)
        loose = torch.zeros_like(x, dtype=torch.bool)
        if k.endswith("qkv.bias"):
            loose[DIM : 2 * DIM] = True
        for mask, rtol, atol in ((~loose, 1e-5, 1e-6), (loose, 0.0, 1e-3)):
            d = (x[mask] - y[mask]).abs()
            assert bool((d <= atol + rtol * y[mask].abs()).all()), f"{what}[{k}]: max |diff| {d.max():.3g}"


@pytest.mark.parametrize("optimizer", ["adam", "offload"])
@pytest.mark.parametrize("new_world", [1, 4])
def test_resume_at_another_world_size_recuts_model_and_optimizer(
    tmp_path: Path, optimizer: str, new_world: int
) -> None:
    root = str(tmp_path / "ckpt")
    base = Plan(optimizer=optimizer, dropout=0.0, stop=6)
    whole = _run(2, replace(base, root=root, save_at=(3,), snapshot_at=(3, 6)))
    resumed = _run(new_world, replace(base, root=root, load=True, snapshot_at=(3, 6)))
    saved, loaded = whole[0]["snapshots"][3], resumed[0]["snapshots"][3]
    assert_same(loaded, saved, f"model and optimizer re-cut from 2 to {new_world} ranks")
    info = resumed[0]["info"]
    assert (info.step, info.world_size, info.resharded) == (3, 2, True)
    assert [r["info"].extra for r in resumed] == [{"rank": r if r < 2 else 0} for r in range(new_world)]
    assert [r["info"].rng_restored != () for r in resumed] == [r < 2 for r in range(new_world)]
    end_a, end_b = whole[0]["snapshots"][6], resumed[0]["snapshots"][6]
    _close(end_b["model"], end_a["model"], "parameters after step 6")
    assert set(end_b["optim"]) == set(end_a["optim"])
    for i, a in end_a["optim"].items():
        b = end_b["optim"][i]
        assert a["step"] == b["step"] == 6
        moments = ("exp_avg", "exp_avg_sq")  # _param_fp32 (offload) is the parameter, compared above
        _close({k: b[k] for k in moments}, {k: a[k] for k in moments}, f"optimizer state of parameter {i}")
    assert end_b["manager"] == end_a["manager"]
    mean = [sum(r["losses"][s] for r in runs) / len(runs) for runs in (whole, resumed) for s in (6,)]
    assert abs(mean[0] - mean[1]) <= 1e-6 * abs(mean[0])


def _content_equal(a: dict, b: dict, what: str, close: bool) -> None:
    """Flat shards' gathered states, whose whole buffers are padded to the group size: equal over
    the shorter one, the longer one zero beyond it."""
    for i, sa in a.items():
        sb = b[i]
        assert sa["step"] == sb["step"], f"{what}: step of parameter {i}"
        for k in ("exp_avg", "exp_avg_sq"):
            x, y = sa[k].reshape(-1), sb[k].reshape(-1)
            n = min(x.numel(), y.numel())
            if close:
                torch.testing.assert_close(x[:n], y[:n], rtol=1e-5, atol=1e-6, msg=lambda m, k=k, i=i: f"{what}: {k} of {i}: {m}")
            else:
                assert torch.equal(x[:n], y[:n]), f"{what}: {k} of flat parameter {i}"
            assert not x[n:].any() and not y[n:].any(), f"{what}: the padding of {k} of {i} is not zero"


@pytest.mark.parametrize("optimizer", ["adam", "offload"])
@pytest.mark.parametrize("new_world", [1, 4])
def test_resume_of_flat_shards_at_another_world_size(tmp_path: Path, optimizer: str, new_world: int) -> None:
    """An optimizer over ``bmt.grouped_parameters(model)`` (the Blocks' flat shards, padded to the
    group size): re-cut by the elements that hold parameters; the padding starts at zero."""
    root = str(tmp_path / "ckpt")
    base = Plan(optimizer=optimizer, dropout=0.0, stop=6, flat=True)
    whole = _run(2, replace(base, root=root, save_at=(3,), snapshot_at=(3, 6)))
    resumed = _run(new_world, replace(base, root=root, load=True, snapshot_at=(3, 6)))
    assert resumed[0]["info"].resharded
    saved, loaded = whole[0]["snapshots"][3], resumed[0]["snapshots"][3]
    assert_same(loaded["model"], saved["model"], "the model re-cut")
    _content_equal(loaded["optim"], saved["optim"], f"flat optimizer state re-cut from 2 to {new_world} ranks", False)
    end_a, end_b = whole[0]["snapshots"][6], resumed[0]["snapshots"][6]
    _close(end_b["model"], end_a["model"], "parameters after step 6")
    _content_equal(end_b["optim"], end_a["optim"], "flat optimizer state after step 6", True)


def test_a_checkpoint_with_the_old_flat_layout_loads_at_the_same_size(tmp_path: Path) -> None:
    """Checkpoints written before flat shards were recognised (recorded as whole tensors) still
    resume bitwise at the world size they were saved at."""
    root = str(tmp_path / "ckpt")
    base = Plan(dropout=0.0, stop=5, flat=True, snapshot_at=(5,))
    whole = _run(2, replace(base, root=root, save_at=(3,), legacy_layout=True))
    resumed = _run(2, replace(base, root=root, load=True))
    assert not resumed[0]["info"].resharded
    assert_same(resumed[0]["snapshots"][5], whole[0]["snapshots"][5], "resumed from the old layout")


def test_flat_shards_against_parameters_is_named(tmp_path: Path) -> None:
    root = str(tmp_path / "ckpt")
    _run(2, Plan(dropout=0.0, stop=3, root=root, save_at=(3,)))
    with pytest.raises(Exception, match=r"with 23 parameters, this optimizer has 3 \(an optimizer over model.parameters"):
        _run(1, Plan(dropout=0.0, stop=4, root=root, load=True, flat=True))


@pytest.mark.gpu
@pytest.mark.parametrize("optimizer", ["adam", "offload"])
def test_bf16_resume_on_cuda_is_bitwise(tmp_path: Path, optimizer: str) -> None:
    """One GPU, bf16 parameters, dropout drawn from the CUDA generator: the resumed steps' losses
    and the final shards equal the uninterrupted run's bitwise (cuBLAS in its deterministic
    workspace mode)."""
    env = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    base = Plan(optimizer=optimizer, dropout=0.1, stop=6, dtype="bfloat16")
    whole = run_distributed(run, 1, base, env=env, timeout=180)
    root = str(tmp_path / "ckpt")
    run_distributed(run, 1, replace(base, stop=3, root=root, save_at=(3,)), env=env, timeout=180)
    resumed = run_distributed(run, 1, replace(base, root=root, load=True), env=env, timeout=180)
    assert resumed[0]["info"].step == 3
    assert resumed[0]["losses"] == {s: whole[0]["losses"][s] for s in (4, 5, 6)}
    assert_same(resumed[0]["shards"], whole[0]["shards"], "bf16 parameters after step 6")
