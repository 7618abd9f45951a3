"""``AdamOffloadOptimizer`` hiding the CPU, on one GPU: ``overlap=True`` (gradient copies on their
side stream during backward), ``OptimManager.update_during_backward()`` (the CPU Adam started
from the autograd thread, new values copied back while the backward goes on; with
``overlap_forward`` landing at each Block's first read in the next forward; guarded, scaled or
clipped: each Block's gradients checked on the copy stream, see ``test_offload_checked``), ``delay_update``
(the background thread and the device staging tensors) and ``offload_fraction`` (the fused
Triton kernel for the part kept on the GPU), with the same assertions as the CPU tests:
bit-identical to the default offload step; the delayed scheme equal to plain torch's within
1e-6; the partial offload equal to the full one to rtol=1e-5.

Run on a GPU host: ``python -m pytest tests/gpu/test_offload_overlap_gpu.py -v``.
"""

from __future__ import annotations

from typing import Any

import pytest

from ..ckpt.test_offload_checked import _checked_matches_default, _checked_rules
from ..ckpt.test_offload_overlap import (
    _delayed_matches_reference,
    _eager_is_exact,
    _eager_rules,
    _overlap_is_exact,
    _partial_offload,
)

pytestmark = [pytest.mark.gpu, pytest.mark.world_size(1)]


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_overlap_is_exact_on_gpu(spawn: Any, dtype_name: str) -> None:
    spawn(_overlap_is_exact, dtype_name, True)


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_update_during_backward_is_exact_on_gpu(spawn: Any, dtype_name: str) -> None:
    spawn(_eager_is_exact, dtype_name, True)


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_overlap_forward_is_exact_on_gpu(spawn: Any, dtype_name: str) -> None:
    """Each Block's update lands (host->device copies on their side stream) at its first read in
    the next forward: the training is still bit-identical to the default offload step."""
    spawn(_eager_is_exact, dtype_name, True, True)


def test_update_during_backward_rules_on_gpu(spawn: Any) -> None:
    spawn(_eager_rules)


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
@pytest.mark.parametrize("mode", ["guard", "scale", "edit", "clip"])
def test_checked_backward_on_gpu(spawn: Any, dtype_name: str, mode: str) -> None:
    """The checks (flag, norm parts) run on the gradient copy stream, the step reads them after
    an event: equal to the default offload step as on CPU."""
    spawn(_checked_matches_default, dtype_name, True, mode)


@pytest.mark.parametrize("mode", ["guard", "clip"])
def test_checked_backward_with_overlap_forward_on_gpu(spawn: Any, mode: str) -> None:
    spawn(_checked_matches_default, "bfloat16", True, mode, True)


@pytest.mark.parametrize("mode", ["guard", "scale", "edit", "state", "clip"])
def test_speculative_updates_on_gpu(spawn: Any, mode: str) -> None:
    """``speculative_fraction=1``: updates started during the checked backward, kept or undone at
    the step (host->device copies only once kept): equal to the default step as on CPU."""
    spawn(_checked_matches_default, "bfloat16", True, mode, True, 1.0)


def test_checked_backward_rules_on_gpu(spawn: Any) -> None:
    spawn(_checked_rules)


def test_delayed_update_on_gpu(spawn: Any, tmp_path: Any) -> None:
    spawn(_delayed_matches_reference, str(tmp_path))


@pytest.mark.parametrize("mode", ["step", "overlap", "eager", "lazy", "delayed"])
def test_partial_offload_on_gpu(spawn: Any, mode: str) -> None:
    spawn(_partial_offload, mode)
