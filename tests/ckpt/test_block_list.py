"""TransformerBlockList on gloo: training equals plain torch; hidden states, several hidden states,
inputs with and without grad, frozen parameters, gradient accumulation.

Tolerances (fp32): losses and gathered parameters within rtol=1e-5, atol=1e-5 of plain torch; the
only differences are summation orders (reduce-scatter over ranks vs one batch).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from .models import (
    Config,
    Layer,
    TwoStateLayer,
    batch,
    causal_mask,
    distribute_,
    holds_no_gather,
    make_layers,
    plain_copy,
    rows,
)

RTOL, ATOL = 1e-5, 1e-5
STEPS = 10
LR = 0.05


def _close(a: torch.Tensor, b: torch.Tensor, what: str, rtol: float = RTOL, atol: float = ATOL) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype, f"{what}: {a.shape}/{a.dtype} vs {b.shape}/{b.dtype}"
    a, b = a.cpu().float(), b.cpu().float()
    if not torch.allclose(a, b, rtol=rtol, atol=atol):
        raise AssertionError(f"{what}: max abs difference {(a - b).abs().max().item():.3g} (rtol={rtol}, atol={atol})")


def _build(
    cfg: Config, zero_level: int, use_checkpoint: bool, kind: type = Layer, num_hidden: int = 1,
    dtype: torch.dtype = torch.float32, layers: nn.ModuleList | None = None,
):
    """The plain layers (on this rank's device, in ``dtype``) and a copy of them as a block list."""
    import bmt_comm
    from bmt_ckpt import Block, TransformerBlockList

    if layers is None:
        layers = make_layers(cfg, seed=7, kind=kind)
    layers = layers.to(device=bmt_comm.get_context().device, dtype=dtype)
    ref = plain_copy(layers)
    blocks = [Block(distribute_(m), use_checkpoint=use_checkpoint, zero_level=zero_level) for m in layers]
    return ref, TransformerBlockList(blocks, num_hidden=num_hidden)


def _sgd(params: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for p in params:
            if p.grad is not None:
                p.add_(p.grad, alpha=-LR)


def _global_loss(local: torch.Tensor) -> float:
    import bmt_comm

    t = local.detach().clone()
    bmt_comm.get_context().comms.zero.all_reduce(t, "sum")
    return float(t)


def _train_equals_plain(
    zero_level: int, use_checkpoint: bool, style: str, optim_on: str, cfg: Config | None = None,
    dtype: torch.dtype = torch.float32, rtol: float = RTOL, atol: float = ATOL,
) -> None:
    """10 SGD steps; the loss is the mean over the global batch, so each rank's share is its sum / N."""
    import bmt_comm

    ctx = bmt_comm.get_context()
    rank, world = ctx.rank, ctx.world_size
    cfg = cfg or Config()
    ref, model = _build(cfg, zero_level, use_checkpoint, dtype=dtype)
    mask = causal_mask(cfg.seq).to(ctx.device)
    flat = [p for _, ps in (g for b in model for g in b.grouped_parameters()) for p in ps]
    views = list(model.parameters())
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in ref.named_parameters()]
    n = 4 * world
    for step in range(STEPS):
        x, target = (t.to(ctx.device, dtype) for t in batch(cfg, n, seed=100 + step))
        h = x
        for layer in ref:
            h = layer(h, mask)
        ref_loss = ((h.float() - target.float()) ** 2).mean()
        ref.zero_grad()
        ref_loss.backward()
        _sgd(list(ref.parameters()))

        xl, tl = rows(x, rank, world), rows(target, rank, world)
        if style == "list":
            out = model(xl, mask)
        else:
            out = xl
            for block in model:
                out = block(out, mask)
        loss = ((out.float() - tl.float()) ** 2).sum() / (n * cfg.seq * cfg.dim)
        loss.backward()
        _sgd(flat if optim_on == "flat" else views)
        if optim_on == "flat":
            for p in flat:
                p.grad = None
        else:
            model.zero_grad()
        _close(torch.tensor(_global_loss(loss)), ref_loss.detach().cpu(), f"loss at step {step}", rtol, atol)
    state, ref_state = model.state_dict(), ref.state_dict()
    assert list(state) == list(ref_state)
    for key, value in ref_state.items():
        _close(state[key], value, f"parameter {key} after {STEPS} steps", rtol, atol)
    for block in model:
        assert all(not torch.is_tensor(p.grad) or p.grad.numel() == p.numel() for p in block.parameters())


def _train_all_configs() -> None:
    for zero_level, use_checkpoint, style in itertools.product((2, 3), (True, False), ("list", "loop")):
        optim_on = "flat" if (zero_level + use_checkpoint) % 2 else "views"
        try:
            _train_equals_plain(zero_level, use_checkpoint, style, optim_on)
        except AssertionError as e:
            raise AssertionError(
                f"zero_level={zero_level} use_checkpoint={use_checkpoint} style={style} optim={optim_on}: {e}"
            ) from e


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_training_matches_plain_torch(spawn, world_size):
    spawn(_train_all_configs)


def _hidden_states_and_input_grads(cfg: Config) -> None:
    """return_hidden_states; an input that requires grad gets the plain-torch gradient."""
    ref, model = _build(cfg, zero_level=3, use_checkpoint=True)
    mask = causal_mask(cfg.seq)
    x, target = batch(cfg, 3, seed=5)
    xr, xd = x.clone().requires_grad_(), x.clone().requires_grad_()
    hidden, h = [], xr
    for layer in ref:
        hidden.append(h)
        h = layer(h, mask)
    ref_stack = torch.stack(hidden)
    out, stack = model(xd, mask, return_hidden_states=True)
    assert stack.shape == (cfg.layers, 3, cfg.seq, cfg.dim)
    _close(out, h, "output")
    _close(stack, ref_stack, "hidden states")
    # every rank holds the same data: dividing by the world size makes the summed gradient the plain one
    world = _world()
    (((h - target) ** 2).mean() + ref_stack.square().mean()).backward()
    ((((out - target) ** 2).mean() + stack.square().mean()) / world).backward()
    _close(xd.grad * world, xr.grad, "input gradient")
    _check_grads(model, ref)
    assert isinstance(model(xd, mask), torch.Tensor)


def _world() -> int:
    import bmt_comm

    return bmt_comm.get_context().world_size


def _check_grads(model, ref) -> None:
    """Each parameter's local gradient is its slice of the plain model's full gradient."""
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
        if q.grad is None:
            assert p.grad is None or not p.grad.any(), name
            continue
        _close(p.grad, q.grad.reshape(-1)[p._start_partition : p._end_partition], f"gradient of {name}")


def _two_hidden_states(cfg: Config) -> None:
    """num_hidden=2, outputs of different shapes: forward, hidden states, 3 training steps."""
    ref, model = _build(cfg, zero_level=2, use_checkpoint=True, kind=TwoStateLayer, num_hidden=2)
    mask = causal_mask(cfg.seq)
    world = _world()
    for step in range(3):
        x, target = batch(cfg, 2, seed=20 + step)
        gate = torch.zeros(2, cfg.seq)
        h, g, hidden_h, hidden_g = x, gate, [], []
        for layer in ref:
            hidden_h.append(h)
            hidden_g.append(g)
            h, g = layer(h, g, mask)
        out, og, sh, sg = model(x, gate, mask, return_hidden_states=True)
        assert sh.shape == (cfg.layers, 2, cfg.seq, cfg.dim) and sg.shape == (cfg.layers, 2, cfg.seq)
        _close(out, h, "hidden state 1")
        _close(og, g, "hidden state 2")
        _close(sg, torch.stack(hidden_g), "stacked hidden state 2")
        ref.zero_grad()
        (((h - target) ** 2).mean() + g.square().mean()).backward()
        ((((out - target) ** 2).mean() + og.square().mean()) / world).backward()
        _check_grads(model, ref)
        _sgd(list(ref.parameters()))
        _sgd(list(model.parameters()))
        model.zero_grad()
    pair = model(x, gate, mask)
    assert isinstance(pair, tuple) and len(pair) == 2


def _frozen_parameters(cfg: Config) -> None:
    """LayerNorms frozen: their own flat buffer, no gradient, never changed; the rest trains as plain."""

    layers = make_layers(cfg, seed=3)
    for layer in layers:
        for ln in (layer.ln1, layer.ln2):
            ln.requires_grad_(False)
    ref = plain_copy(layers)
    from bmt_ckpt import Block, TransformerBlockList

    model = TransformerBlockList([Block(distribute_(m), zero_level=3) for m in layers])
    keys = [b.layout.key.name for b in model[0].storage.buffers]
    assert keys == ["float32_nograd", "float32_grad"], keys
    before = {k: v.clone() for k, v in model.state_dict().items() if ".ln" in k}
    mask, world = causal_mask(cfg.seq), _world()
    for step in range(3):
        x, target = batch(cfg, 2, seed=40 + step)
        h = x
        for layer in ref:
            h = layer(h, mask)
        ref.zero_grad()
        ((h - target) ** 2).mean().backward()
        (((model(x, mask) - target) ** 2).mean() / world).backward()
        _check_grads(model, ref)
        for block in model:
            frozen = block.storage.buffers[0]
            assert frozen.shard.grad is None and all(p.grad is None for p in frozen.params)
            assert holds_no_gather(block.storage)
        _sgd(list(ref.parameters()))
        _sgd(list(model.parameters()))
        model.zero_grad()
    state = model.state_dict()
    for key, value in ref.state_dict().items():
        _close(state[key], value, key)
    for key, value in before.items():
        assert torch.equal(state[key], value), key


def _accumulation(cfg: Config) -> None:
    """Gradients of 4 micro-batches accumulated equal those of one batch 4 times larger."""
    from bmt_ckpt import Block, TransformerBlockList

    mask, world = causal_mask(cfg.seq), _world()
    for zero_level, ckpt in ((2, False), (3, True)):
        a = TransformerBlockList([Block(distribute_(m), ckpt, zero_level) for m in make_layers(cfg, seed=9)])
        b = TransformerBlockList([Block(distribute_(m), ckpt, zero_level) for m in make_layers(cfg, seed=9)])
        x, target = batch(cfg, 8 * world, seed=60)
        xl, tl = rows(x, _rank(), world), rows(target, _rank(), world)
        norm = x.numel()
        for chunk in range(4):
            sl = slice(2 * chunk, 2 * chunk + 2)
            (((a(xl[sl], mask) - tl[sl]) ** 2).sum() / norm).backward()
        (((b(xl, mask) - tl) ** 2).sum() / norm).backward()
        for ba, bb in zip(a, b, strict=True):
            for fa, fb in zip(ba.storage.flat_parameters(), bb.storage.flat_parameters(), strict=True):
                _close(fa.grad, fb.grad, f"accumulated gradient (zero_level={zero_level})")


def _rank() -> int:
    import bmt_comm

    return bmt_comm.get_context().rank


def _list_features() -> None:
    cfg = Config()
    _hidden_states_and_input_grads(cfg)
    _two_hidden_states(cfg)
    _frozen_parameters(cfg)
    _accumulation(cfg)


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_hidden_states_frozen_params_and_accumulation(spawn, world_size):
    spawn(_list_features)
