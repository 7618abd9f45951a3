"""A parameter frozen after a backward keeps its ``.grad``, as in torch: later backwards (without
zero_grad) leave it as it was, in Blocks (ZeRO 2 and 3, a partly frozen Block and a wholly frozen
one) and for DistributedParameters outside Blocks; ``bmt.inspect.inspect_model`` reports the same
gradient statistics as for the plain torch model. Unfrozen again, the parameter accumulates its
gradient onto the kept one, as torch does; ``zero_grad`` on the optimizer clears it, as torch's does.

The plain torch model runs in the same process on the same batch; tolerances rtol=1e-5,
atol=1e-6 (fp32); inspect statistics rtol=1e-4 (pooled moments in another order).
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest
import torch
from torch import nn

from ._frozen_models import BATCH, DIM, check_grads, distribute_, make_layers, plain_copy

FROZEN = ("blocks.0.fc1.weight", "blocks.1.fc1.weight", "blocks.1.fc1.bias", "blocks.1.fc2.weight",
          "blocks.1.fc2.bias", "head.b")  # all of block 1, part of block 0, one outside any Block


class Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(DIM, DIM) * 0.3)
        self.b = nn.Parameter(torch.randn(DIM) * 0.1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h @ self.w.t() + self.b


class Model(nn.Module):
    def __init__(self, blocks: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.blocks = blocks
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for layer in self.blocks:
            h = layer(h)
        return self.head(h)


def _distributed_head(plain: Head) -> nn.Module:
    from bmt_zero import DistributedModule, DistributedParameter

    class DHead(DistributedModule):
        def __init__(self) -> None:
            super().__init__()
            self.w = DistributedParameter(plain.w.detach())
            self.b = DistributedParameter(plain.b.detach())

        def forward(self, h: torch.Tensor) -> torch.Tensor:
            return h @ self.w.t() + self.b  # reads gather the full tensors

    return DHead()


def _params(model: nn.Module) -> dict[str, nn.Parameter]:
    return dict(model.named_parameters())


def _inspect_agrees(model: nn.Module, ref: nn.Module, what: str) -> dict[str, tuple[float, float]]:
    """inspect_model's gradient statistics of the model and of the plain torch model agree."""
    from bmtrain.inspect import inspect_model

    got = {r["name"]: r for r in inspect_model(model, "*")}
    want = {r["name"]: r for r in inspect_model(ref, "*")}
    assert list(got) == list(want), (list(got), list(want))
    for name, w in want.items():
        g = got[name]
        assert g["shape"] == w["shape"], f"{what}: {name} shape {g['shape']} vs {w['shape']}"
        for key in ("grad_mean", "grad_std"):
            if not math.isclose(g[key], w[key], rel_tol=1e-4, abs_tol=1e-7):
                raise AssertionError(f"{what}: inspect_model {name} {key} {g[key]:.6g}, torch model {w[key]:.6g}")
    return {name: (g["grad_mean"], g["grad_std"]) for name, g in got.items()}


def _step(model: nn.Module, ref: nn.Module, x: torch.Tensor, target: torch.Tensor, world: int) -> None:
    ((ref(x) - target) ** 2).sum().backward()
    (((model(x) - target) ** 2).sum() / world).backward()


def _run(zero_level: int, ckpt: bool) -> None:
    import bmt_comm
    from bmt_ckpt import Block, TransformerBlockList

    what = f"zero_level={zero_level} use_checkpoint={ckpt}"
    ctx = bmt_comm.get_context()
    dev, world = ctx.device, ctx.world_size
    layers = make_layers(seed=3, device=dev)[:2]
    torch.manual_seed(4)
    head = Head().to(dev)
    ref = Model(plain_copy(layers), plain_copy(head))
    model = Model(
        TransformerBlockList([Block(distribute_(m), use_checkpoint=ckpt, zero_level=zero_level) for m in layers]),
        _distributed_head(head),
    )
    params, ref_params = _params(model), _params(ref)
    assert list(params) == list(ref_params)
    gen = torch.Generator().manual_seed(5)
    batches = [tuple(torch.randn(BATCH, DIM, generator=gen).to(dev) for _ in range(2)) for _ in range(4)]

    _step(model, ref, *batches[0], world)
    check_grads(model, ref, f"{what}: first backward")
    for name in FROZEN:
        params[name].requires_grad_(False)
        ref_params[name].requires_grad_(False)
    kept = {name: params[name].grad.clone() for name in FROZEN}  # type: ignore[union-attr]
    stats = _inspect_agrees(model, ref, f"{what}: before the frozen backward")

    _step(model, ref, *batches[1], world)  # no zero_grad: trainable grads accumulate
    check_grads(model, ref, f"{what}: backward with frozen params")
    for name in FROZEN:
        grad = params[name].grad
        assert grad is not None and torch.equal(grad, kept[name]), f"{what}: frozen {name}.grad changed"
    after = _inspect_agrees(model, ref, f"{what}: after the frozen backward")
    for name in FROZEN:
        assert after[name] == stats[name], f"{what}: inspect_model {name} grad {stats[name]} -> {after[name]}"

    for name in FROZEN:  # unfrozen: accumulates onto the kept gradient, as torch does
        params[name].requires_grad_(True)
        ref_params[name].requires_grad_(True)
    _step(model, ref, *batches[2], world)
    check_grads(model, ref, f"{what}: backward after unfreezing")
    _inspect_agrees(model, ref, f"{what}: after unfreezing")

    # zero_grad on the optimizers (flat params and outside ones; torch: every param) clears all
    flats = [p for _, ps in model.blocks[0].grouped_parameters() for p in ps]
    flats += [p for _, ps in model.blocks[1].grouped_parameters() for p in ps]
    opt = torch.optim.SGD([*flats, *model.head.parameters()], lr=0.1)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    opt.zero_grad()
    ref_opt.zero_grad()
    for name in FROZEN:
        params[name].requires_grad_(False)
        ref_params[name].requires_grad_(False)
    _step(model, ref, *batches[3], world)
    check_grads(model, ref, f"{what}: frozen after zero_grad")  # frozen .grad None in both
    _inspect_agrees(model, ref, f"{what}: frozen after zero_grad")


def _all() -> None:
    import bmt_comm

    if bmt_comm.get_context().device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 reference comparisons
    for zero_level, ckpt in itertools.product((2, 3), (True, False)):
        _run(zero_level, ckpt)


@pytest.mark.parametrize("world_size", [1, 2])
def test_frozen_param_keeps_grad(spawn: Any, world_size: int) -> None:
    spawn(_all)


@pytest.mark.gpu
def test_frozen_param_keeps_grad_gpu(spawn: Any) -> None:
    spawn(_all)
