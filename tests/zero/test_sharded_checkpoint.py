"""save_sharded / load_sharded: one safetensors file per rank, loadable at any world size."""

from __future__ import annotations

import json
import os

import pytest
import torch

from ..harness import run_distributed
from ._models import block_model, full_state, same, store_model


def _listing(tmp: str) -> list[str]:
    return sorted(os.listdir(tmp))


def _save_at_one(tmp: str) -> None:
    import bmt_zero

    bmt_zero.save_sharded(store_model(scale=3.0), os.path.join(tmp, "from1"))


def _save_at_four(tmp: str) -> None:
    import bmt_comm
    import bmt_zero
    from bmt_zero.store import sharded

    rank = bmt_comm.rank()
    # a checkpoint written by one rank spreads over four
    grown = store_model(scale=0.0)
    bmt_zero.load_sharded(grown, os.path.join(tmp, "from1"))
    same(full_state(grown), full_state(store_model(scale=3.0)), "load at 4 of a world-1 checkpoint")

    bmt_zero.save_sharded(block_model(), os.path.join(tmp, "blocks4"))
    model = store_model()
    ckpt = os.path.join(tmp, "from4")
    bmt_zero.save_sharded(model, ckpt)
    files = sorted(os.listdir(ckpt))
    assert files == ["metadata.json"] + [f"rank-{r:05d}-of-00004.safetensors" for r in range(4)], files
    meta = json.load(open(os.path.join(ckpt, "metadata.json")))
    assert meta["world_size"] == 4 and meta["tp_size"] == 1
    tiny = meta["tensors"]["tiny"]
    assert tiny["shape"] == [3] and tiny["dtype"] == "float32" and tiny["kind"] == "sharded"
    assert tiny["pieces"] == [[0, 0, 0, 1], [1, 0, 1, 2], [2, 0, 2, 3]]  # rank 3 holds nothing
    assert meta["tensors"]["lin.weight"]["kind"] == "replicated" and meta["tensors"]["bf16"]["dtype"] == "bfloat16"
    assert _listing(tmp) == ["blocks4", "from1", "from4"]

    # a save that fails on one rank midway leaves the previous checkpoint and no temporary
    real = sharded.write_shard

    def failing(path: str, tensors: dict, metadata: dict, writer: object) -> None:
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("rank 2 lost its disk (simulated)")

    if rank == 2:
        sharded.write_shard = failing
    try:
        with pytest.raises((OSError, RuntimeError), match="rank 2 lost its disk"):
            bmt_zero.save_sharded(store_model(scale=5.0), ckpt)
    finally:
        sharded.write_shard = real
    assert _listing(tmp) == ["blocks4", "from1", "from4"] and sorted(os.listdir(ckpt)) == files
    again = store_model(scale=0.0)
    bmt_zero.load_sharded(again, ckpt)
    same(full_state(again), full_state(model), "reload after a failed save")


def _load_at_two(tmp: str) -> None:
    import bmt_comm
    import bmt_zero

    want = full_state(store_model())
    model = store_model(scale=0.0)
    result = bmt_zero.load_sharded(model, os.path.join(tmp, "from4"))
    assert result.missing_keys == [] and result.unexpected_keys == []
    same(full_state(model), want, "load at 2 of a world-4 checkpoint")
    bmt_zero.save_sharded(model, os.path.join(tmp, "from2"))

    # shape mismatch, missing and unexpected keys: as torch reports them, on every rank
    with pytest.raises(RuntimeError, match=r"size mismatch for emb: copying a param with shape "
                                           r"torch.Size\(\[11, 3\]\) from checkpoint, the shape in "
                                           r"current model is torch.Size\(\[12, 3\]\)"):
        bmt_zero.load_sharded(store_model(scale=0.0, wide=True), os.path.join(tmp, "from4"))
    smaller = store_model(scale=0.0)
    del smaller.mlp._parameters["b2"]
    smaller.extra = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(RuntimeError, match=r'(?s)Missing key\(s\) in state_dict: "extra".*'
                                           r'Unexpected key\(s\) in state_dict: "mlp.b2"'):
        bmt_zero.load_sharded(smaller, os.path.join(tmp, "from4"))
    result = bmt_zero.load_sharded(smaller, os.path.join(tmp, "from4"), strict=False)
    assert (result.missing_keys, result.unexpected_keys) == (["extra"], ["mlp.b2"])
    with pytest.raises((FileNotFoundError, RuntimeError), match="metadata.json"):
        bmt_zero.load_sharded(store_model(scale=0.0), os.path.join(tmp, "nowhere"))

    # Blocks: their parameters are pieces of flat storage, with other ranges at every world size
    blocks = block_model(scale=0.0)
    assert blocks.layers[1]._parameters["w"]._in_block and not blocks._parameters["head"]._in_block
    bmt_zero.load_sharded(blocks, os.path.join(tmp, "blocks4"))
    want = full_state(block_model())
    assert "layers.1.w" in want and "layers.2.count" in want and "head" in want
    same(full_state(blocks), want, "blocks at 2 from 4")
    path = os.path.join(tmp, "blocks.pt")
    bmt_zero.save(blocks, path)  # gathered file: rank 0 receives each in-block parameter's pieces
    if bmt_comm.rank() == 0:
        same(torch.load(path), want, "blocks file")
    again = block_model(scale=0.0)
    bmt_zero.load(again, path)  # each rank receives only its piece of each in-block parameter
    same(full_state(again), want, "blocks loaded from file")
    bmt_zero.save_sharded(again, os.path.join(tmp, "blocks2"))

    # _save_to_infer_model: each Block of the list reaches the engine on local rank 0, layer by layer
    from bmt_zero.store import _save_to_infer_model

    class Engine:
        def __init__(self) -> None:
            self.layers: list[dict[str, torch.Tensor]] = []

        def load_layer_state_dict(self, state: dict[str, torch.Tensor]) -> None:
            self.layers.append(dict(state))

    engine = Engine()
    rest = _save_to_infer_model(again, engine)
    assert bmt_comm.get_context().settings.save_param_to_cpu  # restored afterwards
    if bmt_comm.get_context().local_rank == 0:
        assert [sorted(layer) for layer in engine.layers] == [
            [f"layers.{i}.b", f"layers.{i}.count", f"layers.{i}.w"] for i in range(3)
        ]
        assert torch.equal(engine.layers[2]["layers.2.w"], want["layers.2.w"]) and list(rest) == ["head"]
    else:
        assert engine.layers == [] and len(rest) == 0


def _load_at_one(tmp: str) -> None:
    import bmt_zero

    want = full_state(store_model())
    for name in ("from4", "from2"):
        model = store_model(scale=0.0)
        bmt_zero.load_sharded(model, os.path.join(tmp, name))
        same(full_state(model), want, f"load at 1 of {name}")
    blocks = block_model(scale=0.0)
    bmt_zero.load_sharded(blocks, os.path.join(tmp, "blocks2"))
    same(full_state(blocks), full_state(block_model()), "blocks at 1 from 2")


def test_sharded_checkpoint_across_world_sizes(tmp_path):
    tmp = str(tmp_path)
    run_distributed(_save_at_one, 1, tmp)
    run_distributed(_save_at_four, 4, tmp)
    run_distributed(_load_at_two, 2, tmp)
    run_distributed(_load_at_one, 1, tmp)
