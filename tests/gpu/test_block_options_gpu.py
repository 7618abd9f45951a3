"""A Block's options on one GPU: selective checkpointing and inductor-compiled inner modules.

A TransformerBlockList of the training yardstick's layers (RMSNorm, rotary + causal SDPA, SwiGLU;
benchmarks/train/yardstick.py at a small size) in bf16 trains 3 SGD steps in every combination
of checkpointing (full, selective "matmul_attention", none) and ``compile`` (off, inductor), and
each equals plain torch and bmt's own full checkpointing. Tolerance: relative error (norm of the
difference over the norm of the reference) at most 2e-2 for outputs, gradients and parameters:
bf16's epsilon is 7.8e-3, and inductor fuses elementwise work in fp32 where eager rounds to bf16
between ops. On the GPU the policy keeps SDPA's flash kernel: backward never runs the attention
forward again.

Run on a machine with a GPU:  python -m pytest tests/gpu/test_block_options_gpu.py -q
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.ckpt.models import distribute_, plain_copy
from tests.ckpt.test_block_options import _OpCounter

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks" / "train"))

from yardstick import Config, Layer, rotary_tables  # noqa: E402

pytestmark = [pytest.mark.gpu]

CFG = Config("small", dim=256, layers=4, heads=2, ffn=512, vocab=1024, seq=256)
TOL = 2e-2
MODES: dict[str, dict[str, Any]] = {
    "full": {},
    "selective": {"checkpoint_policy": "matmul_attention"},
    "none": {"use_checkpoint": False},
    "full, compiled": {"compile": True},
    "selective, compiled": {"checkpoint_policy": "matmul_attention", "compile": True},
    "none, compiled": {"use_checkpoint": False, "compile": True},
}


def _rel_close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    err = ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()
    assert err <= TOL, f"{what}: relative error {err:.3g} > {TOL}"


def _layers() -> list[torch.nn.Module]:
    torch.manual_seed(0)
    return [Layer(CFG).cuda().to(torch.bfloat16) for _ in range(CFG.layers)]


Step = tuple[torch.Tensor, list[torch.Tensor]]  # a step's output and (full-shaped) gradients


def _step(model: Any, opt: torch.optim.Optimizer, step: int) -> Step:
    """One SGD step on step ``step``'s own data."""
    cos, sin = rotary_tables(CFG, torch.device("cuda"))
    g = torch.Generator(device="cuda").manual_seed(100 + step)
    x = torch.randn(2, CFG.seq, CFG.dim, device="cuda", generator=g, dtype=torch.bfloat16)
    y = model(x, cos, sin)
    (y.float() ** 2).mean().backward()
    out = (y.detach(), [p.grad.detach().clone() for p in model.grad_views()])
    opt.step()
    opt.zero_grad()
    return out


class _Plain(torch.nn.Module):
    """Plain torch: the layers under non-reentrant checkpointing."""

    def __init__(self, layers: list[torch.nn.Module]) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(layers)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, use_reentrant=False)
        return x

    def grad_views(self) -> list[torch.Tensor]:
        return list(self.parameters())


class _Bmt(torch.nn.Module):
    def __init__(self, layers: list[torch.nn.Module], **options: Any) -> None:
        from bmt_ckpt import Block, TransformerBlockList

        super().__init__()
        self.blocks = TransformerBlockList([Block(distribute_(m), **options) for m in layers])

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.blocks(x, cos, sin)
        return out

    def grad_views(self) -> list[torch.Tensor]:
        return list(self.blocks.parameters())  # world size 1: each one's shard is its whole tensor


def _options_match_plain() -> None:
    layers = _layers()
    plain = _Plain([plain_copy(m) for m in layers])
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.5)
    want = [_step(plain, plain_opt, i) for i in range(3)]
    results: dict[str, list[Step]] = {}
    for label, options in MODES.items():
        torch._dynamo.reset()
        model = _Bmt([plain_copy(m) for m in layers], **options)
        opt = torch.optim.SGD([p for block in model.blocks for _, ps in block.grouped_parameters() for p in ps], lr=0.5)
        got, graphs = [], []
        for i in range(3):
            got.append(_step(model, opt, i))
            graphs.append(int(torch._dynamo.utils.counters["stats"]["unique_graphs"]))
        results[label] = got
        if options.get("compile"):
            assert graphs[0] > 0 and graphs[-1] == graphs[0], f"{label}: graphs after each step {graphs} (recompiled?)"
        for against, ref in (("plain torch", want), ("bmt full checkpointing", results["full"])):
            for i, ((y, grads), (y_ref, grads_ref)) in enumerate(zip(got, ref, strict=True)):
                _rel_close(y, y_ref, f"{label} vs {against}, step {i}: output")
                for j, (a, b) in enumerate(zip(grads, grads_ref, strict=True)):
                    _rel_close(a.view(b.shape), b, f"{label} vs {against}, step {i}: gradient {j}")


def test_options_train_as_plain_torch_with_inductor(spawn: Any) -> None:
    spawn(_options_match_plain)


def _selective_keeps_attention() -> None:
    """The preset keeps SDPA's output on the GPU kernels too: backward runs no attention forward."""
    layers = _layers()
    cos, sin = rotary_tables(CFG, torch.device("cuda"))
    x = torch.randn(2, CFG.seq, CFG.dim, device="cuda", dtype=torch.bfloat16)
    attention_forwards = {}
    for label in ("full", "selective"):
        model = _Bmt([plain_copy(m) for m in layers], **MODES[label])
        loss = (model(x, cos, sin).float() ** 2).mean()
        counter = _OpCounter()
        with counter:
            loss.backward()
        attention_forwards[label] = sum(
            n for name, n in counter.counts.items() if name.startswith("_scaled_dot_product") and "backward" not in name
        )
    assert attention_forwards["full"] == CFG.layers, attention_forwards
    assert attention_forwards["selective"] == 0, attention_forwards


def test_selective_backward_runs_no_attention_forward(spawn: Any) -> None:
    spawn(_selective_keeps_attention)
