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

from ._models import ATOL, KINDS, RTOL, build, close, token_batch

pytest.importorskip("transformers", reason="transformers is part of the hatch environment; install it to run these")

SGD_PARAM_ATOL = 1e-5  # parameters move by ~0.2 in 10 steps: fp32 summation order shows at ~1e-6
# Adam divides by sqrt(v): a gradient that is rounding noise (an embedding row used once) moves
# its parameter by ~lr whatever its sign, so summation order shows up as up to ~1e-4 after 10 steps
ADAM_PARAM_ATOL = 5e-4
STEPS = 10



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
        # (reading ``.weight`` of a DistributedModule gathers the full tensor: compare the parameters)
        assert model.lm_head._parameters["weight"] is model.transformer.wte._parameters["weight"]  # type: ignore[union-attr]
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
        close(state[key], value, f"{kind}: {key} after {STEPS} steps", param_atol)
    return losses


@pytest.mark.world_size(2)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("adam", [False, True], ids=["sgd", "adam"])
def test_trains_like_plain_torch(spawn, kind: str, adam: bool) -> None:  # type: ignore[no-untyped-def]
    first, second = spawn(_train, kind, adam)
    assert first == second  # every rank reports the same (summed) losses
    assert first[-1][1] < first[0][1], f"{kind}: the loss should fall in {STEPS} steps: {first}"


def _kwargs_grads_and_recording() -> None:
    """A decoder Block gets every keyword (tuples, None, flags) and passes gradients back through
    the ``position_embeddings`` tuple; ``output_hidden_states``/``output_attentions`` record the
    same tensors as the plain model, and a loss on a recorded hidden state trains alike."""
    import bmt_comm
    import bmtrain as bmt

    world = bmt_comm.get_context().world_size
    model = build("llama", attn_implementation="eager")
    ref = copy.deepcopy(model)
    bmt.BMTrainModelWrapper(model)
    ids = token_batch(2, seed=7)
    # one layer called directly, as LlamaModel calls it
    hidden = torch.randn(2, ids.shape[1], 32, generator=torch.Generator().manual_seed(8))
    positions = torch.arange(ids.shape[1]).unsqueeze(0)
    cos, sin = ref.model.rotary_emb(hidden, positions)
    outs, grads = [], []
    for layer in (model.model.layers[0], ref.model.layers[0]):
        h = hidden.clone().requires_grad_()
        c, s = cos.detach().clone().requires_grad_(), sin.detach().clone().requires_grad_()
        out = layer(h, attention_mask=None, position_ids=positions, past_key_values=None, use_cache=False,
                    cache_position=torch.arange(ids.shape[1]), position_embeddings=(c, s), output_attentions=False)
        out = out[0] if isinstance(out, tuple) else out
        (out.square().sum() / (world if layer is model.model.layers[0] else 1)).backward()
        outs.append(out.detach())
        grads.append((h.grad, c.grad, s.grad))
    close(outs[0], outs[1], "decoder layer output")
    for got, want, what in zip(grads[0], grads[1], ("hidden_states", "cos", "sin"), strict=True):
        assert got is not None and want is not None, f"no gradient reached {what}"
        # each rank's grad is its share of the loss: the sum over ranks is the plain one
        close(bmt.sum_loss(got) * world, want, f"gradient of {what} through the Block")
    # recorded outputs, and a loss on one of them
    got = model(input_ids=ids, output_hidden_states=True, output_attentions=True, use_cache=False)
    want = ref(input_ids=ids, output_hidden_states=True, output_attentions=True, use_cache=False)
    assert len(got.hidden_states) == len(want.hidden_states) == 3, (len(got.hidden_states), len(want.hidden_states))
    assert len(got.attentions) == len(want.attentions) == 2
    for i, (a, b) in enumerate(zip(got.hidden_states, want.hidden_states, strict=True)):
        close(a, b, f"hidden_states[{i}]")
    for i, (a, b) in enumerate(zip(got.attentions, want.attentions, strict=True)):
        close(a, b, f"attentions[{i}]")
    for p in ref.parameters():
        p.grad = None
    model.zero_grad()
    (got.hidden_states[1].square().mean() / world).backward()
    want.hidden_states[1].square().mean().backward()
    state_grads = {n: p.grad for n, p in model.named_parameters()}
    for name, q in ref.named_parameters():
        p = dict(model.named_parameters())[name]
        if q.grad is None:
            assert state_grads[name] is None or not state_grads[name].any(), f"{name} should get no gradient"
            continue
        assert p.grad is not None, f"{name}: no gradient through the recorded hidden state"
        close(p.grad, q.grad.reshape(-1)[p._start_partition : p._end_partition], f"gradient of {name} via hidden_states[1]")


@pytest.mark.world_size(2)
def test_layer_keywords_gradients_and_recorded_outputs(spawn) -> None:  # type: ignore[no-untyped-def]
    spawn(_kwargs_grads_and_recording)
