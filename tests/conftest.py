from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from .harness import run_distributed


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "world_size(n): run the test's `spawn` calls on n gloo ranks")
    config.addinivalue_line("markers", "gpu: needs CUDA (skipped without it)")
    config.addinivalue_line("markers", "gpus(n): needs at least n CUDA devices")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for item in items:
        need = 1 if item.get_closest_marker("gpu") else 0
        marker = item.get_closest_marker("gpus")
        if marker:
            need = max(need, int(marker.args[0]))
        if need > have:
            item.add_marker(pytest.mark.skip(reason=f"needs {need} CUDA device(s), found {have}"))


@pytest.fixture
def spawn(request: pytest.FixtureRequest) -> Callable[..., list[Any]]:
    """``spawn(fn, *args, **init_kwargs)`` runs ``fn`` on the test's world size.

    The world size comes from a ``world_size`` parameter of the test, else its
    ``@pytest.mark.world_size(n)`` marker, else 1.
    """
    n = getattr(request.node, "callspec", None) and request.node.callspec.params.get("world_size")
    if not n:
        marker = request.node.get_closest_marker("world_size")
        n = int(marker.args[0]) if marker else 1

    # tests not marked for GPUs run on CPU/gloo even on a GPU machine
    on_gpu = request.node.get_closest_marker("gpu") or request.node.get_closest_marker("gpus")
    env = None if on_gpu else {"CUDA_VISIBLE_DEVICES": ""}

    def run(fn: Callable[..., Any], *args: Any, **init_kwargs: Any) -> list[Any]:
        return run_distributed(fn, int(n), *args, init_kwargs=init_kwargs, env=env)

    return run
