"""save_sharded / load_sharded with a PipelineTransformerBlockList: each stage writes and reads
its own layers; the metadata and the strict key report are the whole model's on every rank."""

from __future__ import annotations

import json
import os

import bmt_comm
import pytest
import torch

from ..harness import run_distributed
from .test_pipeline import LAYERS, _batch, _close, _make_layer, _reference_output, _saved_weights, _tolerances

INIT = {"pipe_size": 2, "num_micro_batches": 2}
ENV = {"CUDA_VISIBLE_DEVICES": ""}


def _layer(tp: bool) -> torch.nn.Module:
    layer = _make_layer(tp)
    layer.register_buffer("count", torch.zeros(2))  # a plain tensor: written whole by its stage
    return layer


def _weights(tp: bool, which: int, layers: int = LAYERS) -> dict[str, torch.Tensor]:
    out = {k: v for k, v in _saved_weights(tp, which).items() if int(k.split(".")[0]) < layers}
    out.update({f"{i}.count": torch.tensor([float(i), float(which)]) for i in range(layers)})
    return out


def _pipeline(tp: bool, layers: int = LAYERS) -> torch.nn.Module:
    from bmt_ckpt.pipeline import PipelineTransformerBlockList

    return PipelineTransformerBlockList([_layer(tp) for _ in range(layers)])


def _same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> None:
    assert sorted(got) == sorted(want), (what, sorted(got), sorted(want))
    for k, v in want.items():
        assert torch.equal(got[k].cpu(), v.cpu()), (what, k)


def _check_output(model: torch.nn.Module, weights: dict[str, torch.Tensor], tp: bool, what: str) -> torch.Tensor:
    ctx = bmt_comm.get_context()
    atol, rtol = _tolerances()
    x, scale, _ = _batch(0, ctx.world_size)[ctx.rank]
    out = model(x.to(ctx.device), scale.to(ctx.device), 0.7).detach()
    _close(out, _reference_output(weights, x, scale, tp), atol, rtol, what, False)
    return out


def _save_block_list(tmp: str) -> None:
    """World 2, no pipeline: the layers as a TransformerBlockList."""
    import bmt_zero
    from bmt_ckpt import TransformerBlockList

    model = TransformerBlockList([_layer(False) for _ in range(LAYERS)])
    model.load_state_dict(_weights(False, 0))
    bmt_zero.save_sharded(model, os.path.join(tmp, "blocks"))


def _expect_error(model: torch.nn.Module, path: str, pattern: str) -> str:
    import bmt_zero

    with pytest.raises(RuntimeError, match=pattern) as info:
        bmt_zero.load_sharded(model, path)
    return str(info.value)


def _pipe_world4(tmp: str) -> list[str]:
    """World 4, pipe 2: load a block list's checkpoint, save the pipeline's, reload it; strict
    reports of keys held by either stage, alike on every rank."""
    import bmt_zero
    from bmt_zero import DistributedModule, DistributedParameter

    rank = bmt_comm.rank()
    model = _pipeline(False)
    result = bmt_zero.load_sharded(model, os.path.join(tmp, "blocks"))
    assert (result.missing_keys, result.unexpected_keys) == ([], [])
    _same(model.state_dict(), _weights(False, 0), "block list -> pipeline")
    _check_output(model, _weights(False, 0), False, "block list -> pipeline output")

    model.load_state_dict(_weights(False, 1))
    pipe = os.path.join(tmp, "pipe")
    bmt_zero.save_sharded(model, pipe)
    meta = json.load(open(os.path.join(pipe, "metadata.json")))
    assert list(meta["tensors"]) == list(model.state_dict()), list(meta["tensors"])  # every stage, in order
    assert meta["tensors"]["4.count"]["pieces"] == [[2, 0, 0, 2]]  # stage 1's first rank writes it
    for layer, ranks in ((0, {0, 1}), (4, {2, 3})):  # a layer's pieces: from its stage's ranks, all of them
        holders = {p[0] for n in ("w1", "b1", "w2", "b2") for p in meta["tensors"][f"{layer}.{n}"]["pieces"]}
        assert holders == ranks, (layer, holders)
    fresh = _pipeline(False)
    bmt_zero.load_sharded(fresh, pipe)
    _same(fresh.state_dict(), _weights(False, 1), "pipeline -> pipeline")
    out = _check_output(fresh, _weights(False, 1), False, "pipeline -> pipeline output")
    assert torch.equal(out, model(*[t.to(out.device) for t in _batch(0, 4)[rank][:2]], 0.7).detach())

    # a pipeline inside a model: keys before and after it keep the whole model's order
    class Outer(DistributedModule):
        def __init__(self, value: float) -> None:
            super().__init__()
            self.head = DistributedParameter(torch.full((3, 2), value))
            self.enc = _pipeline(False)
            self.tail = torch.nn.Linear(2, 2)
            with torch.no_grad():
                self.tail.weight.fill_(value)

    outer = Outer(2.0)
    outer.enc.load_state_dict(_weights(False, 1))
    bmt_zero.save_sharded(outer, os.path.join(tmp, "outer"))
    meta = json.load(open(os.path.join(tmp, "outer", "metadata.json")))
    assert list(meta["tensors"]) == list(outer.state_dict()), list(meta["tensors"])
    assert list(meta["tensors"])[-2:] == ["tail.weight", "tail.bias"]
    again = Outer(0.0)
    bmt_zero.load_sharded(again, os.path.join(tmp, "outer"))
    _same(again.state_dict(), outer.state_dict(), "nested pipeline")

    # ranks whose models disagree on a tensor: raised on every rank, nothing left behind
    odd = torch.nn.Module()
    odd.register_buffer("b", torch.zeros(1 + rank % 2))
    with pytest.raises(ValueError, match=r"must agree on each tensor, but 'b' has shape \[1\] on rank 0 and \[2\] on rank 1"):
        bmt_zero.save_sharded(odd, os.path.join(tmp, "odd"))
    assert sorted(os.listdir(tmp)) == ["blocks", "outer", "pipe"], os.listdir(tmp)

    # layer 5 lives on stage 1 (ranks 2, 3), layer 4 of the checkpoint names no layer of a 4-layer
    # pipeline: both reported on every rank
    longer = _pipeline(False, LAYERS + 1)
    got = bmt_zero.load_sharded(longer, pipe, strict=False)
    names = [f"5.{n}" for n in ("w1", "b1", "w2", "b2", "count")]
    assert (got.missing_keys, got.unexpected_keys) == (names, []), got
    shorter = _pipeline(False, LAYERS - 1)
    got = bmt_zero.load_sharded(shorter, pipe, strict=False)
    assert (got.missing_keys, got.unexpected_keys) == ([], [f"4.{n}" for n in ("w1", "b1", "w2", "b2", "count")])
    _same(shorter.state_dict(), _weights(False, 1, LAYERS - 1), "shorter pipeline, other keys loaded")
    return [
        _expect_error(_pipeline(False, LAYERS + 1), pipe, r'Missing key\(s\) in state_dict: "5.w1", "5.b1"'),
        _expect_error(_pipeline(False, LAYERS - 1), pipe, r'Unexpected key\(s\) in state_dict: "4.w1", "4.b1"'),
    ]


def _pipe_tp_world4(tmp: str) -> None:
    """World 4, pipe 2 x tp 2: a pipeline of tensor-parallel layers round-trips."""
    import bmt_zero

    model = _pipeline(True)
    model.load_state_dict(_weights(True, 1))
    path = os.path.join(tmp, "pipe-tp")
    bmt_zero.save_sharded(model, path)
    meta = json.load(open(os.path.join(path, "metadata.json")))
    assert list(meta["tensors"]) == list(model.state_dict()) and meta["tp_size"] == 2
    assert sorted(p[:2] for p in meta["tensors"]["4.up.weight"]["pieces"]) == [[2, 0], [3, 1]]
    fresh = _pipeline(True)
    result = bmt_zero.load_sharded(fresh, path)
    assert (result.missing_keys, result.unexpected_keys) == ([], [])
    _same(fresh.state_dict(), _weights(True, 1), "tp pipeline -> tp pipeline")
    _check_output(fresh, _weights(True, 1), True, "tp pipeline output")


def _load_at_two(tmp: str) -> None:
    """World 2: the world-4 pipeline's checkpoint into a pipe-2 pipeline (one rank per stage)
    or, with ``pipe_size`` 1, into a TransformerBlockList."""
    import bmt_zero
    from bmt_ckpt import TransformerBlockList

    if bmt_comm.get_context().topology.stages == 2:
        model: torch.nn.Module = _pipeline(False)
    else:
        model = TransformerBlockList([_layer(False) for _ in range(LAYERS)])
    result = bmt_zero.load_sharded(model, os.path.join(tmp, "pipe"))
    assert (result.missing_keys, result.unexpected_keys) == ([], [])
    _same(model.state_dict(), _weights(False, 1), "world-4 pipeline -> world 2")
    _check_output(model, _weights(False, 1), False, "world-4 pipeline -> world 2 output")


def test_pipeline_sharded_checkpoints(tmp_path) -> None:
    tmp = str(tmp_path)
    run_distributed(_save_block_list, 2, tmp, env=ENV)
    messages = run_distributed(_pipe_world4, 4, tmp, env=ENV, init_kwargs=INIT)
    assert all(m == messages[0] for m in messages), messages  # every rank reports alike
    run_distributed(_pipe_tp_world4, 4, tmp, env=ENV, init_kwargs={**INIT, "tp_size": 2})
    run_distributed(_load_at_two, 2, tmp, env=ENV, init_kwargs=INIT)
    run_distributed(_load_at_two, 2, tmp, env=ENV)
