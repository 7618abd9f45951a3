"""Helpers for rank functions (``torch.testing.assert_close`` costs ~2 s to import in each rank)."""

from __future__ import annotations

import torch


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5, atol: float = 1e-6,
                 what: str = "") -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    a, e = actual.detach().cpu().double(), expected.detach().cpu().double()
    if not torch.allclose(a, e, rtol=rtol, atol=atol):
        worst = (a - e).abs().max().item()
        raise AssertionError(f"{what}: max abs difference {worst:.3g} (rtol={rtol}, atol={atol})")
