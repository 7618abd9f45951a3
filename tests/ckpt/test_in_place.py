"""A ZeRO group of one (world size 1): nothing to shard, so nothing is gathered, copied or reduced.

The Blocks' flat shards are their full buffers, autograd accumulates straight into the shards'
gradients, and a DistributedParameter read outside a Block is a view of it. The step keeps its
semantics (accumulation, zero_grad, frozen parameters) and equals plain torch (rtol=1e-5,
atol=1e-5, fp32); the aten ops it runs are plain torch's (under the same non-reentrant
checkpointing) plus one allocation and one zero-fill of each flat gradient per step.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from .models import Config, batch, causal_mask, distribute_, make_layers, plain_copy
from .test_block import _close
from .test_block_options import _OpCounter

# ops that move or fill memory; plain torch runs none of them in this step
MEMORY_OPS = ("copy_", "clone", "_to_copy", "fill_", "zero_", "zeros", "zeros_like", "new_zeros", "empty_like")


def _count_collectives(counts: Counter[str]) -> None:
    import bmt_comm

    comms = bmt_comm.get_context().comms
    for comm in {id(c): c for c in (comms.zero, comms.tp_zero, comms.pp_zero)}.values():
        for name in ("all_gather", "reduce_scatter", "all_reduce", "broadcast"):
            method = getattr(comm, name)

            def counted(*args: Any, _method: Any = method, _name: str = name, **kwargs: Any) -> Any:
                counts[_name] += 1
                return _method(*args, **kwargs)

            setattr(comm, name, counted)


def _in_place_step(zero_level: int, use_checkpoint: bool) -> None:
    from bmt_ckpt import Block, TransformerBlockList

    cfg = Config()
    layers = make_layers(cfg, seed=1)
    ref = plain_copy(layers)
    ref[1].ln1.requires_grad_(False)  # a frozen part: its gradient stays None on both sides
    layers[1].ln1.requires_grad_(False)
    model = TransformerBlockList(
        [Block(distribute_(m), zero_level=zero_level, use_checkpoint=use_checkpoint) for m in layers]
    )
    buffers = [b for block in model for b in block.storage.buffers]
    assert all(b.in_place for b in buffers)
    trainable = sum(b.trainable for b in buffers)
    mask = causal_mask(cfg.seq)
    flats = [p for block in model for _, ps in block.grouped_parameters() for p in ps]
    opt, ref_opt = torch.optim.SGD(flats, lr=0.1), torch.optim.SGD(ref.parameters(), lr=0.1)

    def ref_step(x: torch.Tensor, target: torch.Tensor) -> None:
        for xb, tb in zip(x.chunk(2), target.chunk(2), strict=True):  # two accumulated micro-batches
            h = xb
            for layer in ref:
                h = checkpoint(layer, h, mask, use_reentrant=False) if use_checkpoint else layer(h, mask)
            (((h - tb) ** 2).mean() / 2).backward()

    def bmt_step(x: torch.Tensor, target: torch.Tensor) -> None:
        for xb, tb in zip(x.chunk(2), target.chunk(2), strict=True):
            (((model(xb, mask) - tb) ** 2).mean() / 2).backward()

    counts: Counter[str] = Counter()
    _count_collectives(counts)
    for step in range(3):
        x, target = batch(cfg, 4, seed=10 + step)
        ref_ops, ops = _OpCounter(), _OpCounter()
        with ref_ops:
            ref_step(x, target)
        with ops:
            bmt_step(x, target)
        what = f"zero_level={zero_level} use_checkpoint={use_checkpoint} step {step}"
        assert counts == Counter(), f"{what}: collectives over a group of one: {counts}"
        for name in MEMORY_OPS:
            extra = trainable if name in ("zero_", "empty_like") else 0  # each flat gradient, once per step
            assert ops.counts[name] <= ref_ops.counts[name] + extra, (
                f"{what}: {name} ran {ops.counts[name]} times, plain torch {ref_ops.counts[name]} (+{extra} allowed)"
            )
        for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
            if q.grad is None:
                assert p.grad is None, f"{what}: frozen {name} got a gradient"
                continue
            _close(p.grad.view(q.shape), q.grad, f"{what}: gradient of {name}")
            flat = next(b.shard for b in buffers if any(p is bp for bp in b.params))
            assert p.grad.untyped_storage().data_ptr() == flat.grad.untyped_storage().data_ptr(), name
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
    for key, value in ref.state_dict().items():
        _close(model.state_dict()[key], value, f"after 3 steps: {key}")
    # the parameters are the shards themselves: the same memory before and after the steps
    for b in buffers:
        assert all(v.untyped_storage().data_ptr() == b.shard.untyped_storage().data_ptr() for v in b._full_views)


@pytest.mark.parametrize("world_size", [1])
@pytest.mark.parametrize(("zero_level", "use_checkpoint"), [(3, True), (3, False), (2, True)])
def test_group_of_one_runs_in_place(spawn: Any, world_size: int, zero_level: int, use_checkpoint: bool) -> None:
    spawn(_in_place_step, zero_level, use_checkpoint)


def _sharded_is_not_in_place() -> None:
    from bmt_ckpt import Block

    block = Block(distribute_(make_layers(Config(), seed=1)[0]))
    assert not block.storage.in_place and not any(b.in_place for b in block.storage.buffers)


@pytest.mark.parametrize("world_size", [2])
def test_a_group_of_two_still_shards(spawn: Any, world_size: int) -> None:
    spawn(_sharded_is_not_in_place)


def _in_place_keeps_the_step(tmp: str) -> None:
    """The in-place path under the whole step: 1.0.1's usage (an optimizer over
    ``model.parameters()``), loss scaling, clipping, in-place zeroing, and a checkpoint that
    loads into a fresh model; against torch's Adam and ``clip_grad_norm_``: norms and clipped
    gradients to rtol=1e-5, parameters after 3 steps to 1e-4."""
    import os

    from bmt_ckpt import Block, TransformerBlockList
    from bmt_optim import AdamOptimizer, OptimManager
    from bmt_zero.store import load, save

    cfg = Config()
    mask = causal_mask(cfg.seq)
    layers = make_layers(cfg, seed=2)
    ref = plain_copy(layers)

    def build(source: torch.nn.ModuleList) -> torch.nn.Module:
        return TransformerBlockList([Block(distribute_(plain_copy(m))) for m in source])

    model = build(layers)
    assert all(b.storage.in_place for b in model)
    manager = OptimManager(loss_scale=1024.0)
    manager.add_optimizer(AdamOptimizer(model.parameters(), lr=1e-2, weight_decay=0.0))
    ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-2)
    for step in range(3):
        x, target = batch(cfg, 4, seed=40 + step)
        for xb, tb in zip(x.chunk(2), target.chunk(2), strict=True):
            manager.backward(((model(xb, mask) - tb) ** 2).mean() / 2)
            h = xb
            for layer in ref:
                h = layer(h, mask)
            (((h - tb) ** 2).mean() / 2).backward()
        norm = manager.clip_grad_norm(manager.optimizers[0].param_groups, max_norm=0.05)
        ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm=0.05)
        torch.testing.assert_close(norm, ref_norm, rtol=1e-5, atol=1e-6)
        for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
            # the loss scale is still in bmt's gradients; the step divides it out
            torch.testing.assert_close(p.grad.view(q.shape) / 1024.0, q.grad, rtol=1e-5, atol=1e-7, msg=name)
        assert manager.step()
        ref_opt.step()
        manager.zero_grad()
        ref_opt.zero_grad()
    state = model.state_dict()
    for key, value in ref.state_dict().items():
        # Adam divides by sqrt(v): a last-bit difference in a near-zero gradient (the clip
        # coefficient, summed in another order) moves an element by up to 1e-5 in 3 steps of 1e-2
        torch.testing.assert_close(state[key], value, rtol=1e-4, atol=1e-4, msg=lambda m, k=key: f"{k}: {m}")
    path = os.path.join(tmp, "model.pt")
    save(model, path)
    fresh = build(make_layers(cfg, seed=3))
    load(fresh, path)
    for key, value in state.items():
        assert torch.equal(fresh.state_dict()[key], value), key


@pytest.mark.parametrize("world_size", [1])
def test_group_of_one_keeps_the_step(spawn: Any, world_size: int, tmp_path: Any) -> None:
    spawn(_in_place_keeps_the_step, str(tmp_path))
