"""Frozen Blocks behave as frozen torch layers: a Block whose parameters are all frozen, called on
an input that needs no grad, returns an output that needs none, runs once (no recomputation) and
leaves nothing for a backward (no graph, no ZeRO-2 hold, no backward prefetch of its parameters).
Partly frozen Blocks, and frozen Blocks on inputs that need grad, give torch's gradients.

Each case is compared with the same layers in plain torch in one process (with
``torch.utils.checkpoint`` where the Block checkpoints): each output's ``requires_grad``, each
layer's forward runs, gradients of the input and of every parameter (None where torch's is None),
outputs after an SGD step. Calls as a Python loop over the Blocks and as a TransformerBlockList;
ZeRO 2 and 3; use_checkpoint True and False; parameters frozen before and after the Blocks are
built; PipelineTransformerBlockList (1 and 2 stages).
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from ._frozen_models import (
    BATCH,
    DIM,
    LAYERS,
    check_grads,
    close,
    distribute_,
    freeze,
    holds_no_gather,
    make_layers,
    plain_copy,
)

# name -> (layer -> frozen parameter names, whether the input requires grad)
CASES: dict[str, tuple[dict[int, tuple[str, ...]], bool]] = {
    "all_frozen": ({0: ("*",), 1: ("*",), 2: ("*",)}, False),
    "lower_frozen": ({0: ("*",), 1: ("*",)}, False),  # fine-tuning the top layer
    "frozen_on_grad_input": ({0: ("*",), 1: ("*",)}, True),
    "partly_frozen": ({0: ("fc1.weight", "fc1.bias"), 1: ("fc2.weight",)}, False),
    "middle_frozen": ({1: ("*",)}, False),  # a frozen Block whose input needs grad
}
LR, STEPS = 0.1, 2


def _world() -> int:
    import bmt_comm

    return bmt_comm.get_context().world_size


def _count_gathers(block: Any, counts: list[int], i: int) -> None:
    """Count the all-gathers of the Block's first flat buffer (forward, prefetch and backward)."""
    from bmt_zero.flat_storage import BufferState

    buf = block.storage.buffers[0]
    original = buf.gather_async

    def counting(force: bool = False) -> None:
        if not buf.in_place and (force or buf.state is BufferState.RELEASED):  # in place: nothing to gather
            counts[i] += 1
        original(force)

    buf.gather_async = counting


def _ref_forward(ref: torch.nn.ModuleList, x: torch.Tensor, ckpt: bool) -> list[torch.Tensor]:
    outs, h = [], x
    for layer in ref:
        h = checkpoint(layer, h, use_reentrant=False) if ckpt else layer(h)
        outs.append(h)
    return outs


def _run_case(case: str, zero_level: int, ckpt: bool, style: str, when: str) -> None:
    import bmt_comm
    from bmt_ckpt import Block, TransformerBlockList

    what = f"{case} zero_level={zero_level} use_checkpoint={ckpt} {style} frozen {when} build"
    spec, x_grad = CASES[case]
    dev, world = bmt_comm.get_context().device, _world()
    layers = make_layers(seed=1, device=dev)
    ref = plain_copy(layers)
    freeze(ref, spec)
    if when == "before":
        freeze(layers, spec)
    model = TransformerBlockList([Block(distribute_(m), use_checkpoint=ckpt, zero_level=zero_level) for m in layers])
    if when == "after":
        freeze(model, spec)
    gathers = [0] * LAYERS
    for i, block in enumerate(model):
        _count_gathers(block, gathers, i)
    flats = [p for block in model for _, ps in block.grouped_parameters() for p in ps]
    opt, ref_opt = torch.optim.SGD(flats, lr=LR), torch.optim.SGD(ref.parameters(), lr=LR)
    gen = torch.Generator().manual_seed(7)
    for step in range(STEPS):
        x, target = (torch.randn(BATCH, DIM, generator=gen).to(dev) for _ in range(2))
        xr, xb = x.clone().requires_grad_(x_grad), x.clone().requires_grad_(x_grad)
        for m in (*layers, *ref):
            m.runs = 0
        gathers[:] = [0] * LAYERS
        ref_outs = _ref_forward(ref, xr, ckpt)
        if style == "loop":
            outs, h = [], xb
            for block in model:
                h = block(h)
                outs.append(h)
        else:
            outs = [model(xb)]
        for i, (o, r) in enumerate(zip(outs, ref_outs[-len(outs) :], strict=True)):
            assert o.requires_grad == r.requires_grad, f"{what}: output {i} requires_grad {o.requires_grad}, torch {r.requires_grad}"
            assert (o.grad_fn is None) == (r.grad_fn is None), f"{what}: output {i} grad_fn {o.grad_fn}"
            close(o, r, f"{what}: step {step} output {i}")
        no_backward = [not r.requires_grad for r in ref_outs]  # layers torch never runs backward through
        for i, block in enumerate(model):
            if no_backward[i]:
                runtime = block.runtime
                assert runtime.pending_graphs == 0 and runtime.shared.pending_backward == 0, f"{what}: layer {i} kept for backward"
                assert holds_no_gather(block.storage), f"{what}: layer {i} still holds its gather"
        if ref_outs[-1].requires_grad:
            ((ref_outs[-1] - target) ** 2).sum().backward()
            (((outs[-1] - target) ** 2).sum() / world).backward()
        runs, ref_runs = [m.runs for m in layers], [m.runs for m in ref]
        assert runs == ref_runs, f"{what}: forward runs per layer {runs}, torch {ref_runs}"
        for i in range(LAYERS):
            want = 1 if no_backward[i] or zero_level == 2 else 2  # ZeRO-3 gathers again for backward
            if model[i].storage.in_place:  # a group of one never gathers
                want = 0
            assert gathers[i] == want, f"{what}: layer {i} all-gathered {gathers[i]} times in step {step}, expected {want}"
        check_grads(model, ref, f"{what}: step {step}")
        if x_grad:
            assert xb.grad is not None and xr.grad is not None
            close(xb.grad * world, xr.grad, f"{what}: input gradient")  # each rank's loss is divided by world
        else:
            assert xb.grad is None
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()


def _frozen_blocks(case: str) -> None:
    if bmt_comm_device_is_cuda():
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 reference comparisons
    for zero_level, ckpt, style, when in itertools.product((2, 3), (True, False), ("loop", "list"), ("after", "before")):
        _run_case(case, zero_level, ckpt, style, when)


def bmt_comm_device_is_cuda() -> bool:
    import bmt_comm

    return bmt_comm.get_context().device.type == "cuda"


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("case", list(CASES))
def test_frozen_block_matches_torch(spawn: Any, world_size: int, case: str) -> None:
    spawn(_frozen_blocks, case)


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(CASES))
def test_frozen_block_matches_torch_gpu(spawn: Any, case: str) -> None:
    spawn(_frozen_blocks, case)


# --- PipelineTransformerBlockList ---------------------------------------------------------------
MICROS, LOCAL = 2, 2
PIPE_RTOL, PIPE_ATOL = 1e-4, 1e-5  # micro-batches sum the gradients in another order


def _pipeline_case(case: str) -> None:
    """This rank's rows through the pipeline; torch runs every rank's rows as one batch."""
    import bmt_comm
    from bmt_ckpt.pipeline import PipelineTransformerBlockList

    ctx = bmt_comm.get_context()
    dev, world, rank = ctx.device, ctx.world_size, ctx.rank
    spec, x_grad = CASES[case]
    layers = make_layers(seed=2, device=dev)
    ref = plain_copy(layers)
    freeze(ref, spec)
    model = PipelineTransformerBlockList([distribute_(m) for m in layers])
    for idx in model.layer_ids:
        freeze([model[idx]], {0: spec.get(idx, ())})
    own = model.layer_ids
    gen = torch.Generator().manual_seed(9)
    for step in range(STEPS):
        x, target = (torch.randn(world * LOCAL, DIM, generator=gen).to(dev) for _ in range(2))
        rows = slice(rank * LOCAL, (rank + 1) * LOCAL)
        xr, xb = x.clone().requires_grad_(x_grad), x[rows].clone().requires_grad_(x_grad)
        for m in (*layers, *ref):
            m.runs = 0
        out_ref = _ref_forward(ref, xr, ckpt=True)[-1]  # the pipeline's Blocks checkpoint
        out = model(xb)
        what = f"pipeline {case} step {step}"
        assert out.requires_grad == out_ref.requires_grad, f"{what}: output requires_grad {out.requires_grad}"
        close(out, out_ref[rows], f"{what}: output", PIPE_RTOL, PIPE_ATOL)
        if out_ref.requires_grad:
            ((out_ref - target) ** 2).sum().backward()
            ((out - target[rows]) ** 2).sum().backward()
        # each micro-batch passes each layer as the whole batch passes torch's
        runs = [layers[i].runs for i in own]
        want = [MICROS * ref[i].runs for i in own]
        assert runs == want, f"{what}: forward runs of layers {own}: {runs}, expected {want}"
        for i in own:
            for (name, p), (_, q) in zip(model[i].named_parameters(), ref[i].named_parameters(), strict=True):
                if q.grad is None:
                    assert p.grad is None, f"{what}: {i}.{name}.grad is set, torch's is None"
                else:
                    assert p.grad is not None, f"{what}: {i}.{name}.grad is None"
                    close(p.grad, q.grad.reshape(-1)[p._start_partition : p._end_partition], f"{what}: grad of {i}.{name}", PIPE_RTOL, PIPE_ATOL)
        if x_grad:
            assert xb.grad is not None and xr.grad is not None
            close(xb.grad, xr.grad[rows], f"{what}: input gradient", PIPE_RTOL, PIPE_ATOL)
        with torch.no_grad():
            for p in ref.parameters():
                if p.grad is not None:
                    p -= LR * p.grad
                    p.grad = None
            for block in model:
                for _, flat in block.grouped_parameters():
                    for f in flat:
                        if f.grad is not None:
                            f -= LR * f.grad
                block.zero_grad()


def _pipeline_cases() -> None:
    for case in CASES:
        _pipeline_case(case)


@pytest.mark.parametrize("world_size", [1, 2])
def test_frozen_pipeline_matches_torch(spawn: Any, world_size: int) -> None:
    spawn(_pipeline_cases, pipe_size=world_size, num_micro_batches=MICROS)


# --- a parameter frozen when its Block was built cannot train later -----------------------------
def _unfreeze_after_frozen_build() -> None:
    """Its flat buffer keeps no gradient (1.0.1 drops the gradient silently); here the next
    forward that could train says so. Under no_grad the Block still runs."""
    import re

    from bmt_ckpt import Block

    layer = make_layers(seed=5, device=torch.device("cpu"))[0]
    layer.fc1.requires_grad_(False)
    block = Block(distribute_(layer))
    x = torch.randn(BATCH, DIM)
    with torch.no_grad():
        block(x)
    block.fc1.weight.requires_grad_(True)
    with torch.no_grad():
        block(x)
    message = (
        "parameter 'fc1.weight' of Block(MLP) had requires_grad=False when the Block was built, so its flat "
        "storage keeps no gradient; it cannot be unfrozen later"
    )
    with pytest.raises(RuntimeError, match=re.escape(message)):
        block(x)


@pytest.mark.world_size(1)
def test_unfreezing_a_param_frozen_at_build_raises(spawn: Any) -> None:
    spawn(_unfreeze_after_frozen_build)
