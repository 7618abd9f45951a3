"""``bmtrain.hf`` with tensor and pipeline parallelism, the example Llama's key mapping, and the
errors of a bad import. Weights that only travel must come back bit for bit (``torch.equal``);
logits: rtol=1e-5, atol=1e-6 (fp32)."""

from __future__ import annotations

import os

import pytest
import torch

from ._files import read_dir, write_dir
from ._models import VOCAB, build, close, token_batch

pytest.importorskip("transformers", reason="transformers is part of the hatch environment; install it to run these")



def _barrier() -> None:
    import bmt_comm

    bmt_comm.allgather_objects(None)


def _known(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(11)
    return {k: torch.randn(s, generator=gen) for k, s in shapes.items()}


def _tp_gpt(tmp: str) -> None:
    """tp_size=2: import full tensors (each rank reads its tp slice's shard), export (joined)."""
    import bmt_comm
    import bmtrain as bmt
    from bmt_zero import DistributedParameter
    from bmt_zero.store.model_keys import state_entries
    from bmtrain import hf
    from bmtrain.examples.gpt import GPT, GPTConfig

    ctx = bmt_comm.get_context()
    assert ctx.comms.tp.size == 2
    model = GPT(GPTConfig(vocab_size=VOCAB, block_size=16, n_layer=2, n_head=4, n_embd=32))
    bmt.init_parameters(model)
    entries = state_entries(model)
    split = [e.key for e in entries if isinstance(e.tensor, DistributedParameter) and e.tensor._tp_mode
             and e.tensor._tp_split_dim >= 0]
    assert split, "the example GPT should have tensor-parallel split parameters"
    shapes = {e.key: tuple(e.tensor._tp_original_shape if e.tensor._tp_mode else e.tensor._original_shape)
              for e in entries if isinstance(e.tensor, DistributedParameter)}
    known = _known(shapes)
    src, dst = os.path.join(tmp, "known"), os.path.join(tmp, "export")
    if ctx.rank == 0:
        write_dir(known, src, files=3)
    _barrier()
    hf.load_pretrained(model, src)
    tp = ctx.comms.tp
    for e in entries:
        p = e.tensor
        assert isinstance(p, DistributedParameter)
        full = known[e.key]
        if p._tp_mode and p._tp_split_dim >= 0:
            size = p._original_shape[p._tp_split_dim]
            full = full.narrow(p._tp_split_dim, tp.rank * size, size)
        assert torch.equal(p.detach().reshape(-1), full.reshape(-1)[p._start_partition : p._end_partition]), e.key
    hf.save_pretrained(model, dst, max_shard_size="16KB")
    if ctx.rank == 0:
        exported = read_dir(dst)
        assert exported.keys() == known.keys(), sorted(set(exported) ^ set(known))
        for key, value in known.items():
            assert torch.equal(exported[key], value), f"{key} changed through the tp=2 model"
        assert not os.path.exists(os.path.join(dst, "config.json")), "the example GPT has no transformers config"
    _failed_export_keeps_old(model, dst)


def _failed_export_keeps_old(model: torch.nn.Module, dst: str) -> None:
    """A write that fails on rank 0 midway raises on every rank; the old directory stays whole
    and no temporary is left."""
    import bmt_comm
    from bmt_zero.store import CheckpointError
    from bmtrain import hf
    from bmtrain.hf import save as save_module

    before = sorted(os.listdir(dst))
    real, calls = save_module._write_bytes, []

    def failing(path: str, data: bytes) -> None:
        calls.append(path)
        if len(calls) == 2:
            raise OSError("simulated full disk")
        real(path, data)

    save_module._write_bytes = failing  # type: ignore[assignment]
    try:
        hf.save_pretrained(model, dst, max_shard_size="16KB")
    except CheckpointError as e:
        assert "simulated full disk" in str(e) and "on rank 0" in str(e), str(e)
    else:
        raise AssertionError("the failed export should raise on every rank")
    finally:
        save_module._write_bytes = real  # type: ignore[assignment]
    if bmt_comm.get_context().rank == 0:
        assert len(calls) == 2
    assert sorted(os.listdir(dst)) == before
    assert not [f for f in os.listdir(os.path.dirname(dst)) if ".tmp-" in f], "a temporary was left"


@pytest.mark.world_size(2)
def test_tensor_parallel_import_export(spawn, tmp_path) -> None:  # type: ignore[no-untyped-def]
    spawn(_tp_gpt, str(tmp_path), tp_size=2)


def _llama_cfg(pipeline: bool) -> object:
    from bmtrain.examples.llama import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, block_size=16, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, ffn_dim=64,
                       pipeline=pipeline)


def _example_llama(src: str, dst: str, pipeline: bool, ids: torch.Tensor) -> torch.Tensor | None:
    """The example Llama imports a LlamaForCausalLM directory through its key mapping (rotary row
    order included) and exports it back."""
    import bmt_comm
    import bmtrain as bmt
    from bmtrain import hf
    from bmtrain.examples.llama import Llama

    cfg = _llama_cfg(pipeline)
    mapping = hf.llama_example_mapping(cfg)  # type: ignore[arg-type]
    model = Llama(cfg)  # type: ignore[arg-type]
    bmt.init_parameters(model)
    hf.load_pretrained(model, src, key_mapping=mapping)
    hf.save_pretrained(model, dst, key_mapping=mapping, config=hf.llama_example_hf_config(cfg))  # type: ignore[arg-type]
    if bmt_comm.get_context().rank == 0:
        source, exported = read_dir(src), read_dir(dst)
        assert exported.keys() == source.keys(), sorted(set(exported) ^ set(source))
        for key, value in source.items():
            assert torch.equal(exported[key], value), f"{key} changed through the example Llama"
    if pipeline:
        return None
    with torch.no_grad():
        out: torch.Tensor = model(ids)
    return out


def _hf_llama_dir(tmp: str) -> tuple[torch.nn.Module, str]:
    import transformers
    from bmtrain import hf

    torch.manual_seed(12)
    plain = transformers.LlamaForCausalLM(hf.llama_example_hf_config(_llama_cfg(False)))  # type: ignore[arg-type]
    for p in plain.parameters():
        p.data.add_(torch.randn_like(p) * 0.05)
    src = os.path.join(tmp, "hf")
    plain.save_pretrained(src)
    return plain, src


@pytest.mark.world_size(2)
def test_example_llama_mapping_matches_transformers(spawn, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import transformers

    plain, src = _hf_llama_dir(str(tmp_path))
    ids = token_batch(2, seed=13)
    with torch.no_grad():
        want = plain(input_ids=ids, use_cache=False).logits
    dst = str(tmp_path / "export")
    for got in spawn(_example_llama, src, dst, False, ids):
        close(got, want, "the example Llama's logits vs LlamaForCausalLM's on the same weights")
    with torch.no_grad():
        again = transformers.LlamaForCausalLM.from_pretrained(dst)(input_ids=ids, use_cache=False).logits
    close(again, want, "from_pretrained of the example Llama's export")


@pytest.mark.world_size(2)
def test_pipeline_import_export(spawn, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import transformers

    plain, src = _hf_llama_dir(str(tmp_path))
    dst = str(tmp_path / "export")
    spawn(_example_llama, src, dst, True, token_batch(2, seed=13), pipe_size=2, num_micro_batches=2)
    ids = token_batch(2, seed=14)
    with torch.no_grad():
        got = transformers.LlamaForCausalLM.from_pretrained(dst)(input_ids=ids, use_cache=False).logits
        want = plain(input_ids=ids, use_cache=False).logits
    close(got, want, "from_pretrained of the pipeline model's export")


def _bad_imports(dirs: dict[str, str]) -> dict[str, str]:
    from bmt_zero.store import CheckpointError
    from bmtrain import hf

    out = {}
    for name, directory in dirs.items():
        model = hf.from_config(build_config(), init=False)
        try:
            hf.load_pretrained(model, directory)
        except CheckpointError as e:
            out[name] = str(e)
        else:
            out[name] = "no error"
    model = hf.from_config(build_config(), init=False)
    result = hf.load_pretrained(model, dirs["missing"], strict=False)
    out["non-strict missing"] = repr(result.missing_keys)
    # init=True: the configs' initializer_range (0.02) for matrices, ones for norms
    model = hf.from_config(build_config())
    state = model.state_dict()
    assert torch.equal(state["model.norm.weight"], torch.ones(32))
    std = state["model.embed_tokens.weight"].std().item()
    assert 0.015 < std < 0.025, std
    return out


def build_config() -> object:
    from ._models import config

    return config("llama")


@pytest.mark.world_size(2)
def test_bad_directories_name_the_key(spawn, tmp_path) -> None:  # type: ignore[no-untyped-def]
    plain = build("llama", seed=1)
    good = {k: v.detach() for k, v in plain.state_dict().items()}
    q = "model.layers.1.self_attn.q_proj.weight"
    variants = {
        "missing": {k: v for k, v in good.items() if k != q},
        "shape": {**good, q: good[q][:-1]},
        "dtype": {**good, q: good[q].to(torch.float16)},
        "unexpected": {**good, "model.extra.weight": torch.zeros(2)},
    }
    dirs = {}
    for name, tensors in variants.items():
        dirs[name] = str(tmp_path / name)
        write_dir(tensors, dirs[name])
    dirs["empty"] = str(tmp_path / "empty")
    os.makedirs(dirs["empty"])
    first, second = spawn(_bad_imports, dirs)
    assert first == second, "every rank raises the same error"
    assert f"missing in the checkpoint: {q} (file key '{q}')" in first["missing"], first["missing"]
    assert f"{q}: the file's '{q}' has shape (31, 32), the model's is (32, 32)" in first["shape"], first["shape"]
    assert f"{q}: the file's '{q}' is torch.float16, the model's is torch.float32" in first["dtype"], first["dtype"]
    assert "unexpected key in the checkpoint: 'model.extra.weight'" in first["unexpected"], first["unexpected"]
    assert "holds neither model.safetensors.index.json nor model.safetensors" in first["empty"], first["empty"]
    assert "nothing was loaded" in first["shape"]
    assert q in first["non-strict missing"]
