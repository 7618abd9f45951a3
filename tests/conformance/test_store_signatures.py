"""``bmt.save`` / ``bmt.load`` (and ``bmtrain.store``'s) take 1.0.1's argument names, so keyword
callers (``bmt.save(model, file_name=...)``) run unchanged; a saved model loads back equal."""

from __future__ import annotations

import inspect
import os
from typing import Any

import pytest

from ..zero._models import full_state, same, store_model


def test_signatures_are_1_0_1s() -> None:
    import bmtrain as bmt
    import bmtrain.store

    for save in (bmt.save, bmtrain.store.save):
        assert list(inspect.signature(save).parameters) == ["model", "file_name", "non_blocking"]
    for load in (bmt.load, bmtrain.store.load):
        assert list(inspect.signature(load).parameters) == ["model", "file_name", "strict"]


def _round_trip(tmp: str) -> None:
    import bmtrain as bmt

    path = os.path.join(tmp, "model.pt")
    model = store_model()
    bmt.save(model, file_name=path, non_blocking=False)
    other = store_model(scale=2.0)
    bmt.load(other, file_name=path, strict=True)
    same(full_state(other), full_state(model), "loaded by keyword")


@pytest.mark.parametrize("world_size", [1, 2])
def test_keyword_callers_save_and_load(spawn: Any, world_size: int, tmp_path: Any) -> None:
    spawn(_round_trip, str(tmp_path))
