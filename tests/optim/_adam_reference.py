"""Shared pieces of the Adam tests: random problems and torch's Adam/AdamW as the reference."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SCALE = 256.0  # a power of two: grad*SCALE in fp16/bf16 divided back is exact, so both sides see one gradient
HP = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)


def make_params(shapes: list[tuple[int, ...]], dtype: torch.dtype, seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shapes]


def grads_for(params: list[torch.Tensor], step: int, seed: int = 1) -> list[torch.Tensor]:
    """fp32 gradients for ``step`` (the same on every call and every rank)."""
    g = torch.Generator().manual_seed(seed * 10_000 + step)
    return [torch.randn(p.shape, generator=g) for p in params]


def set_grads(params: list[torch.Tensor], grads: list[torch.Tensor], scale: float) -> None:
    """Scaled gradients in each parameter's dtype."""
    for p, g in zip(params, grads, strict=True):
        p.grad = (g * scale).to(p.dtype)


def run_reference(
    params: list[torch.Tensor],
    steps: int,
    *,
    hold_steps: int = 0,
    maximize: bool = False,
    scale: float = SCALE,
    decoupled: bool = False,
    **hp: Any,
) -> list[torch.Tensor]:
    """torch's optimizer on fp32 copies of ``params`` fed the gradients our optimizer sees.

    The reference is the one the documented rule names: ``torch.optim.Adam`` (L2 decay) for fp32
    parameters, ``torch.optim.AdamW`` for fp16/bf16 ones or with ``decoupled``.
    """
    ref = [torch.nn.Parameter(p.detach().float().clone()) for p in params]
    opt = reference_class(params[0].dtype, decoupled)(ref, maximize=maximize, **{**HP, **hp})
    lr = opt.param_groups[0]["lr"]
    for t in range(1, steps + 1):
        seen = [(g * scale).to(p.dtype).float() / scale for p, g in zip(params, grads_for(params, t), strict=True)]
        for r, g in zip(ref, seen, strict=True):
            r.grad = g
        opt.param_groups[0]["lr"] = 0.0 if t <= hold_steps else lr
        opt.step()
    return [r.detach() for r in ref]


def reference_class(dtype: torch.dtype, decoupled: bool = False) -> type[torch.optim.Optimizer]:
    return torch.optim.AdamW if decoupled or dtype != torch.float32 else torch.optim.Adam


def run_ours(opt: torch.optim.Optimizer, params: list[torch.Tensor], first: int, last: int, scale: float = SCALE) -> None:
    for t in range(first, last + 1):
        set_grads(params, grads_for(params, t), scale)
        opt.step(scale=scale)  # type: ignore[call-arg]


def master_of(opt: torch.optim.Optimizer, p: torch.Tensor) -> torch.Tensor:
    st = opt.state[p]
    return (st["_param_fp32"] if "_param_fp32" in st else p.detach()).reshape(p.shape).float()


def run_in_subprocess(fn: Callable[[], None], env: dict[str, str], timeout: float = 180.0) -> None:
    """``fn()`` in a fresh interpreter with ``env`` added (e.g. TRITON_INTERPRET=1, read at import)."""
    code = f"import {fn.__module__} as m; m.{fn.__name__}()"
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        pytest.fail(f"{fn.__name__} with {env} failed:\n{proc.stdout}\n{proc.stderr[-6000:]}")
