"""A small residual MLP stack built twice from one seed: plain torch (the reference, one process)
and the same layers as DistributedParameters in Blocks. Each layer counts its forward runs.

Every rank feeds the same batch and divides its loss by the world size, so the reduce-scattered
(summed) gradient equals the plain-torch gradient. Tolerances: rtol=1e-5, atol=1e-6 (fp32).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..ckpt.models import distribute_, holds_no_gather, plain_copy  # noqa: F401 - re-exported for the frozen tests

DIM, LAYERS, BATCH = 8, 3, 4
RTOL, ATOL = 1e-5, 1e-6


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(DIM, 2 * DIM)
        self.fc2 = nn.Linear(2 * DIM, DIM)
        self.runs = 0  # forward runs, recomputation included

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.runs += 1
        return x + self.fc2(torch.tanh(self.fc1(x)))


def make_layers(seed: int, device: torch.device) -> nn.ModuleList:
    torch.manual_seed(seed)
    return nn.ModuleList(MLP() for _ in range(LAYERS)).to(device)


def freeze(layers: Iterable[nn.Module], spec: dict[int, tuple[str, ...]]) -> None:
    """``spec``: layer index -> names of its parameters to freeze (``("*",)``: all of them)."""
    for i, layer in enumerate(layers):
        for name, p in layer.named_parameters():
            if i in spec and ("*" in spec[i] or name in spec[i]):
                p.requires_grad_(False)


def close(a: torch.Tensor, b: torch.Tensor, what: str, rtol: float = RTOL, atol: float = ATOL) -> None:
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    if not torch.allclose(a, b, rtol=rtol, atol=atol):
        raise AssertionError(f"{what}: max abs difference {(a - b).abs().max().item():.3g}")


def check_grads(model: nn.Module, ref: nn.Module, what: str) -> None:
    """Each parameter's ``.grad`` (this rank's piece) is torch's: None where torch's is None."""
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
        if q.grad is None:
            assert p.grad is None, f"{what}: {name}.grad is set, torch's is None"
            continue
        assert p.grad is not None, f"{what}: {name}.grad is None, torch's is set"
        close(p.grad, q.grad.reshape(-1)[p._start_partition : p._end_partition], f"{what}: gradient of {name}")
