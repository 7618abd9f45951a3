"""The lifetime of a Block's shard-gradient buffer: one per flat storage, freed when dropped.

With ``optimizer.zero_grad()`` (set_to_none) on the flat parameters, the parameters' ``.grad``
views are the only holders of the old buffer: it must be gone by the next forward, before the
backward allocates a new one. A parameter with no elements on a rank (its range is empty there)
must not keep an old buffer alive either. With ``set_to_none=False`` the buffer is reused.
"""

from __future__ import annotations

import gc
import weakref
from typing import Any

import pytest
import torch


def _model() -> tuple[torch.nn.Module, list[torch.nn.Module], list[torch.Tensor]]:
    from bmt_ckpt import Block, TransformerBlockList
    from bmt_zero import DistributedParameter

    torch.manual_seed(0)
    layers = [torch.nn.Linear(64, 64) for _ in range(3)]  # at world 2, rank 0 holds no bias element
    for layer in layers:
        for name, p in list(layer._parameters.items()):
            layer._parameters[name] = DistributedParameter(p.detach())
    model = TransformerBlockList([Block(layer, use_checkpoint=True, zero_level=3) for layer in layers])
    flat = [p for b in model for _, ps in b.grouped_parameters() for p in ps]
    return model, layers, flat


def _alive(refs: list[weakref.ref[torch.Tensor]]) -> list[int]:
    gc.collect()
    return [i for i, r in enumerate(refs) if r() is not None]


def _check_set_to_none(on: str) -> None:
    """``on="flat"``: the optimizer holds the flat shards; ``"inner"``: the inner parameters (as
    ``model.parameters()`` gives them, 1.0.1's usage), whose set-to-None gradients leave no
    holder of the flat buffer but the flat shard itself: the next forward drops it."""
    import bmt_comm

    model, layers, flat = _model()
    if bmt_comm.world_size() == 2 and bmt_comm.rank() == 0:  # the case of an empty local range is covered
        bias = layers[0].bias
        assert bias._end_partition == bias._start_partition, (bias._start_partition, bias._end_partition)
    opt = torch.optim.SGD(flat if on == "flat" else list(model.parameters()), lr=1e-2)
    x = torch.randn(8, 64)
    refs: list[list[weakref.ref[torch.Tensor]]] = []
    for step in range(4):
        model(x).square().mean().backward()
        assert all(f.grad is not None for f in flat)
        refs.append([weakref.ref(f.grad) for f in flat])  # type: ignore[arg-type]
        for layer, f in zip(layers, flat, strict=True):  # every param's grad is a view of the flat one
            for p in layer.parameters():
                assert p.grad is not None and p.grad.untyped_storage().data_ptr() == f.grad.untyped_storage().data_ptr()
        assert [_alive(r) for r in refs[:-1]] == [[]] * step, f"step {step}: an older buffer lives on"
        opt.step()
        opt.zero_grad()  # set_to_none: the flat grads (or the params' views) go; the rest still hold the buffers
        model(x)  # the next forward lets them go
        assert _alive(refs[-1]) == [], f"step {step}: the dropped buffer outlived the next forward"
        assert all(f.grad is None for f in flat) and all(p.grad is None for p in model.parameters())


def _check_zeroed_in_place() -> None:
    model, _, flat = _model()
    opt = torch.optim.SGD(flat, lr=1e-2)
    x = torch.randn(8, 64)
    ptrs = None
    for _ in range(3):
        model(x).square().mean().backward()
        now = [f.grad.data_ptr() for f in flat]  # type: ignore[union-attr]
        assert ptrs is None or now == ptrs, "zeroed in place: the same buffers are reused"
        ptrs = now
        opt.step()
        opt.zero_grad(set_to_none=False)


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("on", ["flat", "inner"])
def test_dropped_gradient_buffers_are_freed(spawn: Any, world_size: int, on: str) -> None:
    spawn(_check_set_to_none, on)


@pytest.mark.world_size(2)
def test_gradient_buffers_zeroed_in_place_are_reused(spawn: Any) -> None:
    spawn(_check_zeroed_in_place)
