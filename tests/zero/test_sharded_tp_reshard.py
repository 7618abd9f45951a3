"""load_sharded of tensor-parallel parameters at another tp size: slices are re-cut on load.

A checkpoint written at tp 2 loads at tp 4 and without tensor parallelism (into ZeRO models and
into a plain torch module), and one written at tp 1 loads at tp 2; every rank's slice must equal
the same rows of the full tensors, whatever world size the ranks are sharded over.
"""

from __future__ import annotations

import os

import pytest
import torch

from ..harness import run_distributed

G = torch.Generator().manual_seed(11)
FULL = {
    "col": torch.randn(8, 3, generator=G),  # split along dim 0
    "row": torch.randn(3, 8, generator=G),  # split along dim 1
    "sq": torch.randn(4, 4, generator=G),  # split along dim 0 (dim 1 in the mismatched model)
    "rep": torch.randn(5, generator=G),  # tp_mode, not split
    "plain": torch.randn(7, 2, generator=G),  # no tensor parallelism
}
SPLIT = {"col": 0, "row": 1, "sq": 0}


def _model(scale: float, sq_dim: int = 0) -> torch.nn.Module:
    import bmt_comm
    from bmt_zero import DistributedModule, DistributedParameter

    tp = bmt_comm.get_context().comms.tp
    dims = {**SPLIT, "sq": sq_dim}

    class TP(DistributedModule):
        def __init__(self) -> None:
            super().__init__()
            for name, full in FULL.items():
                if name in dims:
                    d = dims[name]
                    size = full.shape[d] // tp.size
                    part = full.narrow(d, tp.rank * size, size) * scale
                    p = DistributedParameter(part.contiguous(), tp_mode=True, tp_split_dim=d)
                else:
                    p = DistributedParameter(full * scale, tp_mode=name == "rep")
                setattr(self, name, p)

    return TP()


def _check(model: torch.nn.Module, what: str) -> None:
    for name, full in FULL.items():
        got = model._parameters[name].gather_all()  # type: ignore[union-attr]
        assert torch.equal(got, full), f"{what}: {name}"


def _save(tmp: str, name: str) -> None:
    import bmt_zero

    bmt_zero.save_sharded(_model(1.0), os.path.join(tmp, name))


def _load(tmp: str, names: list[str], save_as: str | None) -> None:
    import bmt_comm
    import bmt_zero

    tp = bmt_comm.get_context().comms.tp.size
    for name in names:
        model = _model(0.0)
        bmt_zero.load_sharded(model, os.path.join(tmp, name))
        _check(model, f"{name} at tp {tp}")
    if save_as:
        bmt_zero.save_sharded(model, os.path.join(tmp, save_as))
    if tp > 1:  # a saved split along another dimension is another layer: refused, both named
        with pytest.raises(RuntimeError, match="sq: saved split along dim 0 but the model splits it along dim 1"):
            bmt_zero.load_sharded(_model(0.0, sq_dim=1), os.path.join(tmp, "tp2"))
        if "tp1" in names:  # an unsplit tensor may be cut along any dimension
            model = _model(0.0, sq_dim=1)
            bmt_zero.load_sharded(model, os.path.join(tmp, "tp1"))
            _check(model, "tp1 cut along dim 1")


def _load_plain(tmp: str, names: list[str]) -> None:
    import bmt_zero

    for name in names:
        plain = torch.nn.Module()
        for key, full in FULL.items():
            plain.register_parameter(key, torch.nn.Parameter(torch.zeros_like(full)))
        bmt_zero.load_sharded(plain, os.path.join(tmp, name))
        for key, full in FULL.items():
            assert torch.equal(getattr(plain, key).detach(), full), f"{name} into a plain module: {key}"


def test_tensor_parallel_slices_are_recut_on_load(tmp_path):
    tmp = str(tmp_path)
    run_distributed(_save, 4, tmp, "tp2", init_kwargs={"tp_size": 2})
    run_distributed(_load, 4, tmp, ["tp2"], "tp4", init_kwargs={"tp_size": 4})
    run_distributed(_load, 2, tmp, ["tp2", "tp4"], "tp1", init_kwargs={"tp_size": 1})
    run_distributed(_load, 4, tmp, ["tp1", "tp4"], None, init_kwargs={"tp_size": 2})
    run_distributed(_load_plain, 1, tmp, ["tp2", "tp4", "tp1"])
