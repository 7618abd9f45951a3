"""``bmtrain.hf``: build on meta, export to and import from Hugging Face's safetensors layout.

2 gloo ranks share a temporary directory. Logits are compared with rtol=1e-5, atol=1e-6 (fp32,
different summation orders); weights that only travel (a round trip, an import then an export)
must come back bit for bit (``torch.equal``).
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from ._files import read_dir
from ._models import KINDS, build, close, config, model_class, token_batch

pytest.importorskip("transformers", reason="transformers is part of the hatch environment; install it to run these")



def _shard_report(model: torch.nn.Module) -> tuple[int, int, int]:
    """(elements this rank holds, elements of the whole model, the largest tensor this rank holds)."""
    from bmt_zero import DistributedParameter

    held, total, largest, seen = 0, 0, 0, set()
    for _, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        assert isinstance(p, DistributedParameter), type(p)
        assert p.device.type != "meta"
        held += p.numel()
        total += p._original_shape.numel()
        largest = max(largest, p.numel())
    for module in model.modules():  # a Block's flat storage: its shard is all it allocates
        storage = getattr(module, "_runtime", None)
        if storage is not None:
            for buf in module.storage.buffers:  # type: ignore[attr-defined]
                largest = max(largest, buf.shard.numel())
    return held, total, largest


def _export_then_load(kind: str, out_dir: str) -> dict[str, torch.Tensor]:
    """Train 2 SGD steps wrapped, export (several files), then import into a model built on meta."""
    import bmt_comm
    import bmtrain as bmt
    from bmtrain import hf

    ctx = bmt_comm.get_context()
    model = bmt.BMTrainModelWrapper(build(kind, seed=3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ids = token_batch(2, seed=4)
    for _ in range(2):
        opt.zero_grad()
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        opt.step()
    hf.save_pretrained(model, out_dir, max_shard_size="8KB")
    files = sorted(os.listdir(out_dir))
    assert "config.json" in files and "model.safetensors.index.json" in files, files
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 2, f"8KB files should cut the model into several: {files}"
    for name in shards:  # within the limit unless one tensor alone is bigger
        with open(os.path.join(out_dir, name), "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        sizes = [v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"]
        assert sum(sizes) <= 8000 or len(sizes) == 1, (name, sizes)
    assert not [f for f in os.listdir(os.path.dirname(out_dir)) if ".tmp-" in f], "a temporary was left"
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
    state = model.state_dict()
    # round trip: a model built on meta (shards only) imports the export bit for bit
    fresh = hf.from_config(config(kind), init=False)
    held, total, largest = _shard_report(fresh)
    # its share (each tensor's split is rounded up to whole elements), never the whole
    assert held <= 0.55 * total and largest < total / ctx.world_size, (held, largest, total)
    result = hf.load_pretrained(fresh, out_dir)
    assert result.missing_keys == [] and result.unexpected_keys == []
    again = fresh.state_dict()
    assert again.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(again[key], value), f"{kind}: {key} changed in the round trip"
    with torch.no_grad():
        close(fresh(input_ids=ids, use_cache=False).logits, logits, f"{kind}: logits after the round trip")
    return {"logits": logits, "ids": ids}


@pytest.mark.world_size(2)
@pytest.mark.parametrize("kind", KINDS)
def test_export_loads_in_transformers(spawn, tmp_path, kind: str) -> None:  # type: ignore[no-untyped-def]
    out_dir = str(tmp_path / "export")
    first, second = spawn(_export_then_load, kind, out_dir)
    close(first["logits"], second["logits"], "the ranks' logits")
    loaded = model_class(kind).from_pretrained(out_dir)
    with torch.no_grad():
        logits = loaded(input_ids=first["ids"], use_cache=False).logits
    close(logits, first["logits"], f"{kind}: transformers' from_pretrained logits vs the trained model's")
    if kind == "gpt2":
        assert loaded.lm_head.weight is loaded.transformer.wte.weight
        assert "lm_head.weight" not in read_dir(out_dir), "a tied tensor is written once"


def _import_saved(directory: str, ids: torch.Tensor) -> torch.Tensor:
    from bmtrain import hf

    model = hf.from_pretrained(directory)
    held, total, largest = _shard_report(model)
    assert held < total and largest < total / 2, (held, total, largest)
    with torch.no_grad():
        out: torch.Tensor = model(input_ids=ids, use_cache=False).logits
    return out


@pytest.mark.world_size(2)
@pytest.mark.parametrize("kind", KINDS)
def test_save_pretrained_directory_imports(spawn, tmp_path, kind: str) -> None:  # type: ignore[no-untyped-def]
    plain = build(kind, seed=5)
    for p in plain.parameters():  # away from the init values: a skipped tensor would show
        p.data.add_(torch.randn_like(p) * 0.05)
    directory = str(tmp_path / "hf")
    plain.save_pretrained(directory, max_shard_size="20KB")
    ids = token_batch(3, seed=6)
    with torch.no_grad():
        want = plain(input_ids=ids, use_cache=False).logits
    for got in spawn(_import_saved, directory, ids):
        close(got, want, f"{kind}: logits of the imported model")


def _streams_while_gathering(out_dir: str) -> tuple[int, int, int]:
    """Rank 0 writes each file as soon as it is full, while later parameters are still being
    gathered: it never holds more than one file's tensors (8 KB here, or one larger tensor)."""
    import bmtrain as bmt
    from bmtrain import hf
    from bmtrain.hf import save as hf_save

    model = bmt.BMTrainModelWrapper(build("llama", seed=5))
    seen, flushes = [0], []
    cls = hf_save._StreamedFiles
    setitem, flush = cls.__setitem__, cls.flush

    def counting_setitem(self: object, key: str, value: object) -> None:
        seen[0] += 1
        setitem(self, key, value)  # type: ignore[arg-type]

    def recording_flush(self: object) -> None:
        flushes.append((seen[0], self.pending_bytes, len(self.pending)))  # type: ignore[attr-defined]
        flush(self)  # type: ignore[arg-type]

    cls.__setitem__, cls.flush = counting_setitem, recording_flush  # type: ignore[method-assign]
    try:
        hf.save_pretrained(model, out_dir, max_shard_size="8KB")
    finally:
        cls.__setitem__, cls.flush = setitem, flush  # type: ignore[method-assign]
    for _, nbytes, count in flushes:
        assert nbytes <= 8000 or count == 1, flushes
    first = flushes[0][0] if flushes else 0
    return first, seen[0], len(flushes)


@pytest.mark.world_size(2)
def test_export_streams_files_while_gathering(spawn, tmp_path) -> None:  # type: ignore[no-untyped-def]
    (first, entries, flushes), _ = spawn(_streams_while_gathering, str(tmp_path / "out"))
    assert flushes > 2 and first < entries / 2, (first, entries, flushes)


def _hooked_model_is_written_whole(out_dir: str) -> list[str]:
    """A state-dict post-hook may rename entries after they are set: such a model is collected
    whole, then written, and the file holds what ``state_dict()`` gives."""
    import bmtrain as bmt
    from bmtrain import hf

    model = bmt.BMTrainModelWrapper(build("llama", seed=6))

    def rename(module: object, state: dict, prefix: str, local_metadata: object) -> None:
        if prefix + "norm.weight" in state:  # ranks other than 0 collect nothing when exporting
            state["renamed.norm.weight"] = state.pop(prefix + "norm.weight")

    model.model._register_state_dict_hook(rename)  # type: ignore[union-attr, operator]
    want = {k: v.clone() for k, v in model.state_dict().items()}
    hf.save_pretrained(model, out_dir, max_shard_size="8KB")
    got = read_dir(out_dir)
    assert sorted(got) == sorted(want), sorted(set(got) ^ set(want))
    for key, value in want.items():
        assert torch.equal(got[key], value.cpu()), key
    return sorted(got)


@pytest.mark.world_size(2)
def test_export_of_a_model_with_state_dict_hooks(spawn, tmp_path) -> None:  # type: ignore[no-untyped-def]
    keys, _ = spawn(_hooked_model_is_written_whole, str(tmp_path / "out"))
    assert "renamed.norm.weight" in keys
