"""VPEmbedding's shapes and values as BMTrain 1.0.1's, against plain torch in one process.

1.0.1, tp rank ``r`` of ``tp``, table ``W`` ``(V, d)`` split by rows into ``W_r``:
- ``emb(ids)`` = ``F.embedding(ids, W)``, any int shape;
- ``emb(x, projection=True)``, ``x_r`` ``(n, s, d)``: the tp ranks' inputs stacked ``(tp, n, s, d)``
  and *viewed* as ``(n, tp*s, d)`` (memory order, no transpose), times ``W_r^T``:
  ``(n, tp*s, V/tp)``. Gradients: ``x_r`` gets the sum over ranks of its piece's gradient, ``W``
  the sum over ranks.
fp32 on gloo; atol 1e-5, rtol 1e-4 (only summation order differs).
"""

from __future__ import annotations

from typing import Any

import bmt_comm
import pytest
import torch
import torch.nn.functional as F
from bmt_zero import DistributedParameter
from bmt_zero.nn import VPEmbedding

from ..zero.test_tp_layers import full_grad

V, D, N, S = 8, 4, 3, 5
ATOL, RTOL = 1e-5, 1e-4


def _close(what: str, got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.allclose(got, want, atol=ATOL, rtol=RTOL), f"{what}: max abs err {(got - want).abs().max()}"


def _check(projection: bool) -> list[int]:
    tp = bmt_comm.get_context().comms.tp
    gen = torch.Generator().manual_seed(3)
    table = torch.randn(V, D, generator=gen)
    emb = VPEmbedding(V, D, dtype=torch.float32)
    emb.load_state_dict({"weight": table})
    weight = emb._parameters["weight"]
    assert isinstance(weight, DistributedParameter)
    ref_w = table.clone().requires_grad_()

    if not projection:
        ids = [torch.randint(0, V, (N, S), generator=gen) for _ in range(tp.size)]
        grads = [torch.randn(N, S, D, generator=gen) for _ in range(tp.size)]
        out = emb(ids[tp.rank])
        sum((F.embedding(i, ref_w) * g).sum() for i, g in zip(ids, grads, strict=True)).backward()
        _close("lookup", out, F.embedding(ids[tp.rank], table))
        (out * grads[tp.rank]).sum().backward()
        assert ref_w.grad is not None
        _close("lookup weight grad", full_grad(weight), ref_w.grad)
        return list(out.shape)

    xs = [torch.randn(N, S, D, generator=gen).requires_grad_() for _ in range(tp.size)]
    grads = [torch.randn(N, tp.size * S, V // tp.size, generator=gen) for _ in range(tp.size)]
    stacked = torch.stack(xs).reshape(N, tp.size * S, D)  # 1.0.1's view of the gathered inputs
    ref = [F.linear(stacked, ref_w[q * V // tp.size : (q + 1) * V // tp.size]) for q in range(tp.size)]
    sum((y * g).sum() for y, g in zip(ref, grads, strict=True)).backward()

    x = xs[tp.rank].detach().clone().requires_grad_()
    out = emb(x, projection=True)
    _close("projection", out, ref[tp.rank].detach())
    (out * grads[tp.rank]).sum().backward()
    ref_x_grad, ref_w_grad = xs[tp.rank].grad, ref_w.grad
    assert x.grad is not None and ref_x_grad is not None and ref_w_grad is not None
    _close("projection input grad", x.grad, ref_x_grad)
    _close("projection weight grad", full_grad(weight), ref_w_grad)
    return list(out.shape)


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("projection", [False, True])
def test_vpembedding_matches_1_0_1(spawn: Any, world_size: int, projection: bool) -> None:
    shapes = spawn(_check, projection, tp_size=world_size)
    want = [N, world_size * S, V // world_size] if projection else [N, S, D]
    assert shapes == [want] * world_size
