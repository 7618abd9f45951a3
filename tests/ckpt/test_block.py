"""One Block on gloo: arguments and outputs, the same Block twice, dropout under recomputation,
no_grad/eval, ZeRO-2 holds, prefetch order, state dicts, init_parameters, the model wrapper.

Every rank feeds the same data and divides its loss by the world size, so the reduce-scattered
(summed) gradient equals the plain-torch gradient. Tolerances: rtol=1e-5, atol=1e-5 (fp32).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from .models import Config, batch, causal_mask, distribute_, holds_no_gather, make_layers, plain_copy

RTOL, ATOL = 1e-5, 1e-5


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
    if not torch.allclose(a, b, rtol=RTOL, atol=ATOL):
        raise AssertionError(f"{what}: max abs difference {(a - b).abs().max().item():.3g}")


def _rank() -> int:
    import bmt_comm

    return bmt_comm.get_context().rank


def _world() -> int:
    import bmt_comm

    return bmt_comm.get_context().world_size


def _check_grads(block: nn.Module, ref: nn.Module) -> None:
    for (name, p), (_, q) in zip(block.named_parameters(), ref.named_parameters(), strict=True):
        assert q.grad is not None, name
        _close(p.grad, q.grad.reshape(-1)[p._start_partition : p._end_partition], f"gradient of {name}")


def _kwargs_and_twice(cfg: Config) -> None:
    """Keyword-only arguments reach the module; one Block called twice accumulates both uses."""
    from bmt_ckpt import Block

    mask, world = causal_mask(cfg.seq), _world()
    x, target = batch(cfg, 2, seed=1)
    for zero_level in (2, 3):
        for ckpt in (True, False):
            layer = make_layers(cfg, seed=2)[0]
            ref = plain_copy(layer)
            block = Block(distribute_(layer), use_checkpoint=ckpt, zero_level=zero_level)
            y_ref = ref(ref(x, mask=mask, scale=0.5), mask, scale=2.0)
            y = block(block(x, mask=mask, scale=0.5), mask, scale=2.0)
            _close(y, y_ref, f"output (zero_level={zero_level}, ckpt={ckpt})")
            ((y_ref - target) ** 2).mean().backward()
            (((y - target) ** 2).mean() / world).backward()
            _check_grads(block, ref)


def _dropout(cfg: Config) -> None:
    """Recomputation draws the same dropout masks: checkpoint == no checkpoint == plain torch."""
    from bmt_ckpt import Block

    dcfg = Config(dropout=0.5)
    mask, world = causal_mask(cfg.seq), _world()
    x, target = batch(dcfg, 2, seed=3)
    ref = make_layers(dcfg, seed=4)[0]
    blocks = [Block(distribute_(plain_copy(ref)), use_checkpoint=c, zero_level=z) for c, z in ((True, 3), (False, 3), (True, 2))]
    torch.manual_seed(11)
    y_ref = ref(x, mask)
    ((y_ref - target) ** 2).mean().backward()
    for block in blocks:
        torch.manual_seed(11)
        y = block(x, mask)
        _close(y, y_ref, f"dropout output (use_checkpoint={block.use_checkpoint})")
        (((y - target) ** 2).mean() / world).backward()
        _check_grads(block, ref)
    # train/eval reach the inner module; in eval no dropout
    blocks[0].eval()
    assert not blocks[0].training and not blocks[0]._module.drop.training
    ref.eval()
    _close(blocks[0](x, mask), ref(x, mask), "eval output")
    assert blocks[0].train() is blocks[0] and blocks[0]._module.drop.training


def _rng_untouched_by_recompute(cfg: Config) -> None:
    from bmt_ckpt import Block

    dcfg = Config(dropout=0.5)
    block = Block(distribute_(make_layers(dcfg, seed=4)[0]), use_checkpoint=True)
    x, _ = batch(dcfg, 2, seed=3)
    torch.manual_seed(5)
    y = block(x)
    state = torch.get_rng_state()
    y.sum().backward()
    assert torch.equal(torch.get_rng_state(), state), "backward's recomputation moved the caller's RNG"


def _no_grad_and_holds(cfg: Config) -> None:
    """no_grad keeps nothing; ZeRO-2 keeps the gather until backward (or until the graph dies);
    ZeRO-3 frees it after forward."""
    import gc

    from bmt_ckpt import Block
    from bmt_zero.flat_storage import BufferState

    x, _ = batch(cfg, 2, seed=6)
    ref = make_layers(cfg, seed=8)[0]
    b2 = Block(distribute_(plain_copy(ref)), zero_level=2)
    b3 = Block(distribute_(plain_copy(ref)), zero_level=3, use_checkpoint=False)
    for block in (b2, b3):
        with torch.no_grad():
            y = block(x)
        assert not y.requires_grad and y.grad_fn is None
        _close(y, ref(x), "no_grad output")
        assert holds_no_gather(block.storage)
        assert block.runtime.shared.pending_backward == 0
        assert block.storage.in_place or all(b._full.untyped_storage().nbytes() == 0 for b in block.storage.buffers)
    frozen = Block(distribute_(plain_copy(ref).requires_grad_(False)), zero_level=2)
    y = frozen(x)  # grad mode on, but nothing requires grad: no graph, nothing kept
    assert not y.requires_grad and holds_no_gather(frozen.storage)
    assert frozen.runtime.shared.pending_backward == 0
    y = b2(x)
    assert b2.storage.state is BufferState.GATHERED and b2.runtime.shared.pending_backward == 1
    y.sum().backward()
    assert holds_no_gather(b2.storage) and b2.runtime.shared.pending_backward == 0
    y = b2(x)
    del y
    gc.collect()
    assert holds_no_gather(b2.storage), "a dropped graph still holds the ZeRO-2 gather"
    y = b3(x)
    assert holds_no_gather(b3.storage), "ZeRO-3 keeps parameters after forward"
    y.sum().backward()  # the saved graph's views of the full parameters are valid again
    _close(b3.storage.buffers[0].shard.grad, b2.storage.buffers[0].shard.grad, "ZeRO-3 saved-graph gradient")
    with pytest.raises(RuntimeError, match="frees its saved graph after the first backward"):
        y.sum().backward()


def _outputs(cfg: Config) -> None:
    """Lists become tuples, other structures and non-tensor outputs are kept, ints not differentiable."""
    from bmt_ckpt import Block
    from bmt_zero import DistributedParameter

    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = DistributedParameter(torch.arange(6.0).view(2, 3))

        def forward(self, x: torch.Tensor, *, kind: str) -> object:
            y = x @ self.w
            if kind == "list":
                return [y, y.sum(-1)]
            return {"y": y, "n": 3, "none": None, "idx": y.argmax(-1)}

    block = Block(Odd())
    x = torch.ones(4, 2, requires_grad=True)
    out = block(x, kind="list")
    assert isinstance(out, tuple) and len(out) == 2 and out[1].shape == (4,)
    (out[0].sum() + out[1].sum()).backward()
    _close(x.grad, torch.tensor([[6.0, 24.0]]).expand(4, 2), "input gradient (2 * row sums of w)")
    d = block(x, kind="dict")
    assert set(d) == {"y", "n", "none", "idx"} and d["n"] == 3 and d["none"] is None
    assert d["y"].requires_grad and not d["idx"].requires_grad and d["idx"].dtype == torch.int64
    with torch.no_grad():
        assert isinstance(block(x, kind="list"), tuple)


def _block_features() -> None:
    cfg = Config()
    _kwargs_and_twice(cfg)
    _dropout(cfg)
    _rng_untouched_by_recompute(cfg)
    _no_grad_and_holds(cfg)
    _outputs(cfg)


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_block_call_features(spawn, world_size):
    spawn(_block_features)


def _state_dict_round_trip(cfg: Config) -> None:
    from bmt_ckpt import Block

    ref = make_layers(cfg, seed=12)[0]
    block = Block(distribute_(plain_copy(ref)))
    assert [n for n, _ in block.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert all(type(p).__name__ == "DistributedParameter" for p in block.parameters())
    assert [n for n, _ in block.named_buffers()] == ["pos", "scratch"]
    sd, ref_sd = block.state_dict(), ref.state_dict()
    assert list(sd) == list(ref_sd) and "pos" in sd and "scratch" not in sd
    for k in ref_sd:
        _close(sd[k], ref_sd[k], f"state_dict[{k}]")
        assert sd[k].device.type == "cpu"
    from bmt_zero.gather import gather_to

    with gather_to(0):  # parameter by parameter, kept on rank 0 only
        sd0 = block.state_dict()
    if _rank() == 0:
        assert list(sd0) == list(ref_sd) and all(torch.equal(sd0[k], sd[k]) for k in sd)
    else:
        assert not sd0, list(sd0)
    new = {k: v * 2 + 1 for k, v in ref_sd.items()}
    assert not block.load_state_dict(new).missing_keys
    ref.load_state_dict(new)
    for k, v in block.state_dict().items():
        _close(v, new[k], f"reloaded {k}")
    x, _ = batch(cfg, 2, seed=13)
    _close(block(x), ref(x), "output after load_state_dict")
    with pytest.raises(RuntimeError, match=r'Unexpected key\(s\) in state_dict: "extra"'):
        block.load_state_dict({**new, "extra": torch.zeros(1)})
    missing = dict(new)
    del missing["fc2.weight"]
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "fc2.weight"'):
        block.load_state_dict(missing)
    assert block.load_state_dict(missing, strict=False).missing_keys == ["fc2.weight"]
    bad = {**new, "qkv.weight": torch.zeros(3, 3)}
    with pytest.raises(RuntimeError, match=r"size mismatch for qkv.weight: copying a param with shape torch.Size\(\[3, 3\]\)"):
        block.load_state_dict(bad)


def _init_and_groups(cfg: Config) -> None:
    from bmt_ckpt import Block
    from bmt_zero import DistributedParameter, ParameterInitializer

    class Inited(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = DistributedParameter(torch.empty(5, 7), init_method=ParameterInitializer(nn.init.normal_, std=0.02))
            self.b = DistributedParameter(torch.empty(33), init_method=nn.init.uniform_, group="emb")
            self.c = DistributedParameter(torch.ones(4), requires_grad=False)

    block = Block(Inited())
    torch.manual_seed(3)
    block.init_parameters()
    torch.manual_seed(3)
    a = nn.init.normal_(torch.empty(5, 7), std=0.02)
    b = nn.init.uniform_(torch.empty(33))
    sd = block.state_dict()
    assert torch.equal(sd["a"], a) and torch.equal(sd["b"], b) and torch.equal(sd["c"], torch.ones(4))
    groups = [(g, [p.numel() for p in ps]) for g, ps in block.grouped_parameters()]
    part = [b.layout.partition_numel for b in block.storage.buffers]
    assert [b.layout.key.name for b in block.storage.buffers] == ["float32_grad", "float32_grad_g_emb", "float32_nograd"]
    assert groups == [(None, [part[0], part[2]]), ("emb", [part[1]])], groups


def _shared_module_in_list(cfg: Config) -> None:
    """The same plain module twice: the second Block shares the first one's storage."""
    from bmt_ckpt import TransformerBlockList

    layers = make_layers(Config(layers=2), seed=14)
    ref = plain_copy(layers)
    a, b = (distribute_(m) for m in layers)
    model = TransformerBlockList([a, b, a])
    assert model[2].storage is model[0].storage and model[1].storage is not model[0].storage
    assert model[1].pre_module() is model[0] and model[1].next_module() is model[2]
    x, target = batch(cfg, 2, seed=15)
    y_ref = ref[0](ref[1](ref[0](x)))
    y = model(x)
    _close(y, y_ref, "shared-layer output")
    ((y_ref - target) ** 2).mean().backward()
    (((y - target) ** 2).mean() / _world()).backward()
    _check_grads(model[0], ref[0])
    _check_grads(model[1], ref[1])


def _prefetch_order(cfg: Config) -> None:
    """While block i runs, only blocks i and its next neighbour (i+1 forward, i-1 backward) are
    gathered: the structure of the overlap, checked where collectives are synchronous."""
    from bmt_ckpt import Block, TransformerBlockList
    from bmt_zero.flat_storage import BufferState

    n = 4
    for ckpt in (True, False):
        model = TransformerBlockList(
            [Block(distribute_(m), use_checkpoint=ckpt) for m in make_layers(Config(layers=n), seed=16)]
        )
        seen: list[tuple[str, int, list[int]]] = []

        def hook(index: int, model: nn.Module = model, ckpt: bool = ckpt, seen: list = seen):
            def record(module: nn.Module, args: object) -> None:
                gathered = [j for j, b in enumerate(model) if b.storage.state is not BufferState.RELEASED]
                phase = "backward" if ckpt and torch.is_grad_enabled() else "forward"
                seen.append((phase, index, gathered))

            return record

        for i, block in enumerate(model):
            block._module.register_forward_pre_hook(hook(i))
        x, _ = batch(cfg, 2, seed=17)
        for style in ("list", "loop"):
            seen.clear()
            if style == "list":
                y = model(x)
            else:
                y = x
                for block in model:
                    y = block(y)
            y.sum().backward()
            expect = [("forward", i, [i, i + 1] if i + 1 < n else [i]) for i in range(n)]
            if ckpt:
                expect += [("backward", i, [i - 1, i] if i else [i]) for i in reversed(range(n))]
            if model[0].storage.in_place:  # a group of one: every Block is its own full buffer, always
                expect = [(phase, i, list(range(n))) for phase, i, _ in expect]
            assert seen == expect, (ckpt, style, seen)
            assert all(holds_no_gather(b.storage) for b in model)


def _wrapper(cfg: Config) -> None:
    """BMTrainModelWrapper: ModuleList children become chained Blocks, the rest DistributedModules
    (nested ones inside the Blocks too); training and state_dict match plain torch."""
    from bmt_ckpt import Block, BMTrainModelWrapper, TransformerBlockList
    from bmt_zero import DistributedModule, grouped_parameters

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(cfg.dim, cfg.dim)
            self.layers = make_layers(cfg, seed=18)
            self.head = nn.Linear(cfg.dim, cfg.dim)

        def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            h = self.embed(x)
            for layer in self.layers:
                h = layer(h, mask)
            return self.head(h)

    torch.manual_seed(19)
    net = Net()
    ref = plain_copy(net)
    model = BMTrainModelWrapper(net)
    assert model is net and isinstance(model, DistributedModule)
    assert all(isinstance(b, Block) for b in model.layers)
    assert isinstance(model.layers[0]._module.qkv, DistributedModule)
    assert model.layers[0].next_module() is model.layers[1] and model.layers[2].pre_module() is model.layers[1]
    assert BMTrainModelWrapper(model.layers[0]) is model.layers[0]
    tbl = TransformerBlockList([])
    assert BMTrainModelWrapper(tbl) is tbl
    assert list(model.state_dict()) == list(ref.state_dict())
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in ref.named_parameters()]
    listed = [p for _, ps in grouped_parameters(model) for p in ps]
    assert sum(p.numel() for p in listed) == sum(b.storage.flat_parameters()[0].numel() for b in model.layers) + sum(
        p.numel() for n, p in model.named_parameters() if not n.startswith("layers.")
    )
    # a manual SGD step (torch.optim's first import costs seconds per process, via torch._dynamo)
    def sgd_step(m: nn.Module) -> None:
        with torch.no_grad():
            for p in m.parameters():
                p.add_(p.grad, alpha=-0.1)
        m.zero_grad()

    mask, world = causal_mask(cfg.seq), _world()
    for step in range(3):
        x, target = batch(cfg, 2, seed=30 + step)
        ref_loss = ((ref(x, mask) - target) ** 2).mean()
        loss = ((model(x, mask) - target) ** 2).mean()
        _close(loss.detach(), ref_loss.detach(), f"loss at step {step}")
        ref_loss.backward()
        (loss / world).backward()
        sgd_step(model)
        sgd_step(ref)
    state = model.state_dict()
    for k, v in ref.state_dict().items():
        _close(state[k], v, k)


def _block_state_and_structure() -> None:
    cfg = Config()
    _state_dict_round_trip(cfg)
    _init_and_groups(cfg)
    _shared_module_in_list(cfg)
    _prefetch_order(cfg)
    _wrapper(cfg)


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_block_state_structure_and_wrapper(spawn, world_size):
    spawn(_block_state_and_structure)
