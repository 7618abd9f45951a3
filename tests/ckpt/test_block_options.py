"""A Block's opt-in options on gloo: selective activation checkpointing (``checkpoint_policy``)
and ``torch.compile`` of the inner module (``compile``), alone and together, against plain torch.

Every rank feeds the same data and divides its loss by the world size, so the reduce-scattered
(summed) gradient equals the plain-torch gradient. Tolerances: rtol=1e-5, atol=1e-5 (fp32); the
compiled runs use the ``aot_eager`` backend on CPU (AOTAutograd and its partitioner, eager
kernels), inductor runs in the GPU tests.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from .models import Config, batch, causal_mask, distribute_, make_layers, plain_copy
from .test_block import _close, _world

MATMULS = ("mm", "addmm", "bmm")


def _check_grads(block: nn.Module, ref: nn.Module, what: str) -> None:
    for (name, p), (_, q) in zip(block.named_parameters(), ref.named_parameters(), strict=True):
        assert q.grad is not None and p.grad is not None, name
        _close(p.grad, q.grad.reshape(-1)[p._start_partition : p._end_partition], f"{what}: gradient of {name}")


class _OpCounter(TorchDispatchMode):
    """Counts the aten ops that run (by packet name) while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def _matmuls(counter: _OpCounter) -> int:
    return sum(counter.counts[name] for name in MATMULS)


def _save_nothing(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> bool:
    return False  # PREFER_RECOMPUTE for every op: full checkpointing by another road


def _selective(cfg: Config) -> None:
    """Every policy gives plain torch's outputs and gradients, with dropout (the recomputation
    draws the forward's masks), at ZeRO-2 and ZeRO-3, for a Block called twice."""
    from bmt_ckpt import SAVE_MATMUL_AND_ATTENTION, Block

    dcfg = Config(dropout=0.3)
    mask, world = causal_mask(dcfg.seq), _world()
    x, target = batch(dcfg, 2, seed=3)
    policies: list[object] = ["matmul_attention", "recompute_all", sorted(SAVE_MATMUL_AND_ATTENTION, key=str), _save_nothing]
    for policy in policies:
        for zero_level in (2, 3):
            ref = make_layers(dcfg, seed=4)[0]
            block = Block(distribute_(plain_copy(ref)), zero_level=zero_level, checkpoint_policy=policy)
            torch.manual_seed(11)
            y_ref = ref(ref(x, mask), mask, scale=2.0)
            ((y_ref - target) ** 2).mean().backward()
            torch.manual_seed(11)
            y = block(block(x, mask), mask, scale=2.0)
            what = f"policy {getattr(policy, '__name__', policy)!s:.40}, zero_level={zero_level}"
            _close(y, y_ref, f"{what}: output")
            (((y - target) ** 2).mean() / world).backward()
            _check_grads(block, ref, what)


def _selective_keeps_the_matmuls(cfg: Config) -> None:
    """What the policy keeps is not recomputed: with "matmul_attention" backward runs only the
    gradient matmuls; full checkpointing and a keep-nothing policy run the forward's again."""
    from bmt_ckpt import Block

    mask, world = causal_mask(cfg.seq), _world()
    x, target = batch(cfg, 2, seed=5)
    x.requires_grad_(True)
    counts = {}
    for label, kwargs in (
        ("none", {"use_checkpoint": False}),
        ("full", {}),
        ("selective", {"checkpoint_policy": "matmul_attention"}),
        ("keep nothing", {"checkpoint_policy": _save_nothing}),
        ("recompute_all", {"checkpoint_policy": "recompute_all"}),
    ):
        block = Block(distribute_(make_layers(cfg, seed=6)[0]), **kwargs)
        forward, backward = _OpCounter(), _OpCounter()
        with forward:
            loss = ((block(x, mask) - target) ** 2).mean() / world
        with backward:
            loss.backward()
        counts[label] = (_matmuls(forward), _matmuls(backward))
    fwd, grad_only = counts["none"]
    assert fwd > 0 and counts["full"] == (fwd, grad_only + fwd), counts
    assert counts["selective"] == (fwd, grad_only), counts
    # torch's recomputation stops once the last saved tensor is back (early stop): the layer's last
    # matmul (fc2, whose output no backward needs) is not run again
    assert counts["keep nothing"] == (fwd, grad_only + fwd - 1), counts
    assert counts["recompute_all"] == counts["keep nothing"], counts  # the same, without a per-op policy


class _CountingBackend:
    """aot_eager, counting the graphs dynamo hands it (one per compile or recompile)."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Any:
        from torch._dynamo.backends.registry import lookup_backend

        self.graphs += 1
        return lookup_backend("aot_eager")(gm, example_inputs)


def _compiled(cfg: Config) -> None:
    """A compiled inner module under the Block's gathers and recomputation trains as plain torch
    does (3 SGD steps of a TransformerBlockList), in each checkpointing mode, and compiles once:
    later steps, whose parameters are freshly gathered, reuse the graphs."""
    from bmt_ckpt import Block, TransformerBlockList

    mask, world = causal_mask(cfg.seq), _world()
    for label, kwargs in (
        ("full", {}),
        ("none", {"use_checkpoint": False}),
        ("selective", {"checkpoint_policy": "matmul_attention"}),
        ("recompute_all", {"checkpoint_policy": "recompute_all"}),
    ):
        torch._dynamo.reset()
        backend = _CountingBackend()
        ref = make_layers(cfg, seed=7)
        blocks = TransformerBlockList(
            [Block(distribute_(plain_copy(layer)), compile={"backend": backend}, **kwargs) for layer in ref]
        )
        ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
        opt = torch.optim.SGD(blocks.parameters(), lr=0.1)
        graphs_after_first = None
        for step in range(3):
            x, target = batch(cfg, 2, seed=20 + step)
            y_ref = x
            for layer in ref:
                y_ref = layer(y_ref, mask)
            ((y_ref - target) ** 2).mean().backward()
            y = blocks(x, mask)
            _close(y, y_ref, f"{label}, step {step}: output")
            (((y - target) ** 2).mean() / world).backward()
            for block, layer in zip(blocks, ref, strict=True):
                _check_grads(block, layer, f"{label}, step {step}")
            ref_opt.step()
            opt.step()
            ref_opt.zero_grad()
            opt.zero_grad()
            if step == 0:
                graphs_after_first = backend.graphs
        assert graphs_after_first is not None and graphs_after_first > 0, label
        assert backend.graphs == graphs_after_first, f"{label}: recompiled after the first step ({graphs_after_first} -> {backend.graphs})"
        # the module the user built is not changed by compiling it
        assert not hasattr(ref[0], "_compiled_call_impl") or ref[0]._compiled_call_impl is None


def _compiled_distributed_modules(cfg: Config) -> None:
    """Inner modules made DistributedModules (what BMTrainModelWrapper does to a layer) compile
    whole: their ``__call__`` breaks no graph, and training equals plain torch."""
    from bmt_ckpt import Block, TransformerBlockList
    from bmt_zero import make_distributed
    from torch._dynamo.utils import counters

    mask, world = causal_mask(cfg.seq), _world()
    torch._dynamo.reset()
    counters.clear()
    backend = _CountingBackend()
    ref = make_layers(cfg, seed=9)
    blocks = TransformerBlockList(
        [Block(make_distributed(plain_copy(layer)), compile={"backend": backend}, checkpoint_policy="matmul_attention")
         for layer in ref]
    )
    x, target = batch(cfg, 2, seed=30)
    y_ref = x
    for layer in ref:
        y_ref = layer(y_ref, mask)
    ((y_ref - target) ** 2).mean().backward()
    y = blocks(x, mask)
    (((y - target) ** 2).mean() / world).backward()
    _close(y, y_ref, "DistributedModule layers, compiled: output")
    for block, layer in zip(blocks, ref, strict=True):
        _check_grads(block, layer, "DistributedModule layers, compiled")
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert backend.graphs > 0


def _no_grad_path_compiled(cfg: Config) -> None:
    from bmt_ckpt import Block

    torch._dynamo.reset()
    backend = _CountingBackend()
    ref = make_layers(cfg, seed=8)[0]
    block = Block(distribute_(plain_copy(ref)), compile={"backend": backend}, checkpoint_policy="matmul_attention")
    x, _ = batch(cfg, 2, seed=9)
    with torch.no_grad():
        _close(block(x), ref(x), "no_grad output")
    assert backend.graphs >= 1
    assert "selective checkpointing, compiled" in repr(block)


def _block_options() -> None:
    cfg = Config()
    _selective(cfg)
    _selective_keeps_the_matmuls(cfg)
    _compiled(cfg)
    _compiled_distributed_modules(cfg)
    _no_grad_path_compiled(cfg)


@pytest.mark.parametrize("world_size", [1, 2])
def test_block_options_match_plain_torch(spawn, world_size):
    spawn(_block_options)


def _bad_options() -> None:
    from bmt_ckpt import Block

    cfg = Config()

    def layer() -> nn.Module:
        return distribute_(make_layers(cfg, seed=1)[0])

    with pytest.raises(ValueError, match=r"checkpoint_policy='matmul' is not a preset; the presets are \['matmul_attention', 'recompute_all'\]"):
        Block(layer(), checkpoint_policy="matmul")
    with pytest.raises(TypeError, match=r"torch.ops.aten.mm.default, got aten.mm .*OpOverloadPacket \(use aten.mm.default\)"):
        Block(layer(), checkpoint_policy=[torch.ops.aten.mm])
    with pytest.raises(TypeError, match="checkpoint_policy must be None, a preset name, .* got int"):
        Block(layer(), checkpoint_policy=3)
    with pytest.raises(TypeError, match="compile must be a bool or a mapping of torch.compile options, got str"):
        Block(layer(), compile="inductor")


def test_bad_block_options_are_named(spawn):
    spawn(_bad_options)
