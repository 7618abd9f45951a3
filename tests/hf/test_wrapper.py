"""transformers causal LMs through ``bmt.BMTrainModelWrapper`` on 2 gloo ranks.

The same tiny random model is built on every rank; a deep copy trains in plain torch on the whole
batch, the wrapped one on this rank's rows through ``OptimManager``, whose backward divides the loss by the world size (``torch.optim.SGD`` on both,
or ``bmt.optim.AdamOptimizer`` against ``torch.optim.Adam``: its fp32 path is torch's Adam) so the summed gradients are the whole batch's. Tolerance: rtol=1e-5, atol=1e-6 (fp32) for losses;
parameters rtol=1e-5 with atol=1e-5 (SGD) or 5e-4 (Adam, see ADAM_PARAM_ATOL).
"""

from __future__ import annotations

import copy

import pytest
import torch

from ._models import KINDS, build, token_batch

pytest.importorskip("transformers", reason="transformers is part of the hatch environment; install it to run these")

RTOL, ATOL = 1e-5, 1e-6
SGD_PARAM_ATOL = 1e-5  # parameters move by ~0.2 in 10 steps: fp32 summation order shows at ~1e-6
# Adam divides by sqrt(v): a gradient that is rounding noise (an embedding row used once) moves
# its parameter by ~lr whatever its sign, so summation order shows up as up to ~1e-4 after 10 steps
ADAM_PARAM_ATOL = 5e-4
STEPS = 10


def _close(a: torch.Tensor, b: torch.Tensor, what: str, atol: float = ATOL) -> None:
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
    if not torch.allclose(a, b, rtol=RTOL, atol=atol):
        raise AssertionError(f"{what}: max abs difference {(a - b).abs().max().item():.3g}")


def _train(kind: str, adam: bool) -> list[tuple[float, float]]:
    import bmt_comm

    import bmtrain as bmt

    ctx = bmt_comm.get_context()
    model = build(kind)
    ref = copy.deepcopy(model)
    tied = kind == "gpt2"
    bmt.BMTrainModelWrapper(model)
    layers = model.transformer.h if kind == "gpt2" else model.model.layers  # type: ignore[union-attr]
    assert all(isinstance(layer, bmt.Block) for layer in layers), [type(layer) for layer in layers]
    if tied:  # the tie survives: one DistributedParameter under both names
        assert model.lm_head.weight is model.transformer.wte.weight  # type: ignore[union-attr]
    if adam:
        opt: torch.optim.Optimizer = bmt.optim.AdamOptimizer(model.parameters(), lr=1e-2)
        ref_opt: torch.optim.Optimizer = torch.optim.Adam(ref.parameters(), lr=1e-2)
    else:
        opt, ref_opt = torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.SGD(ref.parameters(), lr=0.1)
    manager = bmt.optim.OptimManager()
    manager.add_optimizer(opt)
    param_atol = ADAM_PARAM_ATOL if adam else SGD_PARAM_ATOL
    losses = []
    ids = token_batch(2 * ctx.world_size, seed=1)  # one batch, so the loss must fall
    for _ in range(STEPS):
        mine = ids.chunk(ctx.world_size)[ctx.rank]
        ref_opt.zero_grad()
        ref_loss = ref(input_ids=ids, labels=ids, use_cache=False).loss
        ref_loss.backward()
        ref_opt.step()
        manager.zero_grad()
        loss = model(input_ids=mine, labels=mine, use_cache=False).loss
        manager.backward(loss)  # OptimManager divides by grad_scale (the zero group's size, as 1.0.1)
        manager.step()
        total = bmt.sum_loss(loss.detach()).item()  # the mean over ranks = the whole batch's loss
        losses.append((total, ref_loss.item()))
    for step, (got, want) in enumerate(losses):
        assert abs(got - want) <= ATOL + RTOL * abs(want), f"{kind} step {step}: loss {got} vs {want}"
    state, ref_state = model.state_dict(), ref.state_dict()
    assert state.keys() == ref_state.keys(), sorted(set(state) ^ set(ref_state))
    for key, value in ref_state.items():
        _close(state[key], value, f"{kind}: {key} after {STEPS} steps", param_atol)
    return losses


@pytest.mark.world_size(2)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("adam", [False, True], ids=["sgd", "adam"])
def test_trains_like_plain_torch(spawn, kind: str, adam: bool) -> None:  # type: ignore[no-untyped-def]
    first, second = spawn(_train, kind, adam)
    assert first == second  # every rank reports the same (summed) losses
    assert first[-1][1] < first[0][1], f"{kind}: the loss should fall in {STEPS} steps: {first}"
