"""Triton cross-entropy and inf/nan kernels on CUDA against torch (fp32 reference).

Run on a GPU host: ``python -m pytest tests/gpu/test_loss_gpu.py -v -s`` (the 2-GPU test needs two
devices). Memory lines are printed with ``-s``.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path
from typing import Any

import bmt_comm
import pytest
import torch
import torch.nn.functional as F
from bmt_optim._triton_support import Backend, backend_for
from bmt_optim.loss import FusedCrossEntropy
from bmt_optim.nan_check import check_inf_nan_, has_inf_nan, new_flag

pytestmark = pytest.mark.gpu

ULP = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
MIB = 1 << 20


def _case(n: int, c: int, dtype: torch.dtype, seed: int, hw: bool, dev: Any) -> tuple[Any, ...]:
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = (torch.randn(n, c, generator=g) * 4).to(dtype).to(dev)
    t = torch.randint(0, c, (n,), generator=g)
    t[::7] = -100
    w = (torch.rand(c, generator=g) + 0.1).to(dev) if hw else None
    return x, t.to(dev), w


def _compare(x: torch.Tensor, t: torch.Tensor, w: torch.Tensor | None, what: str, **kw: Any) -> None:
    xr = x.detach().float().clone().requires_grad_()
    ref = F.cross_entropy(xr, t, weight=w, **kw)
    xa = x.detach().clone().requires_grad_()
    loss = FusedCrossEntropy(weight=w, **kw)(xa, t)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: {m}")
    go = torch.randn_like(ref)
    loss.backward(go)
    ref.backward(go)
    assert xa.grad is not None and xr.grad is not None and xa.grad.dtype == x.dtype
    torch.testing.assert_close(
        xa.grad.float(), xr.grad, rtol=ULP[x.dtype], atol=1e-6, msg=lambda m: f"{what} grad: {m}"
    )


def test_backend_is_triton() -> None:
    assert backend_for(torch.ones(1, device="cuda")) is Backend.TRITON, "triton missing on the GPU host?"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cross_entropy_options(dtype: torch.dtype) -> None:
    for i, (red, ls, hw) in enumerate(itertools.product(["none", "sum", "mean"], [0.0, 0.1], [False, True])):
        x, t, w = _case(67, 50257, dtype, i, hw, "cuda")  # odd vocabulary: partial last block
        _compare(x, t, w, f"{dtype} {red} ls={ls} weight={hw}", reduction=red, label_smoothing=ls)
    x, t, _ = _case(5, 1000, dtype, 0, False, "cuda")
    t.fill_(-100)
    loss = FusedCrossEntropy()(x, t)
    assert torch.isnan(loss)  # all ignored: nan, like torch


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cross_entropy_large_vocab(dtype: torch.dtype) -> None:
    x, t, _ = _case(256, 128 * 1024, dtype, 1, False, "cuda")
    _compare(x, t, None, f"{dtype} 256x128k", reduction="mean")


@pytest.mark.parametrize("inplace", [False, True])
def test_cross_entropy_peak_memory(inplace: bool) -> None:
    """Logits + gradient + per-row state: no fp32 copy (which alone would be 2x the logits)."""
    n, c, dtype = 256, 128 * 1024, torch.bfloat16
    x, t, _ = _case(n, c, dtype, 2, False, "cuda")
    logits_bytes = x.numel() * x.element_size()
    x.requires_grad_()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()  # the logits themselves
    torch.cuda.reset_peak_memory_stats()
    loss = FusedCrossEntropy(inplace=inplace)(x, t)
    (grad,) = torch.autograd.grad(loss, x)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    print(f"\ninplace={inplace}: logits {logits_bytes / MIB:.0f} MiB, fwd+bwd peak above them {extra / MIB:.1f} MiB")
    if inplace:
        assert grad.data_ptr() == x.data_ptr()  # the gradient overwrote the logits
        assert extra <= 8 * MIB
    else:
        assert extra <= logits_bytes + 8 * MIB


def test_out_of_range_target_is_a_device_assert() -> None:
    code = (
        "import torch; from bmt_optim.loss import FusedCrossEntropy\n"
        "x = torch.randn(4, 10, device='cuda').half(); t = torch.tensor([1, 2, 10, 3], device='cuda')\n"
        "FusedCrossEntropy()(x, t); torch.cuda.synchronize()\n"
    )
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "assert" in proc.stderr.lower(), proc.stderr[-2000:]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_nan_check_kernel(dtype: torch.dtype) -> None:
    n = 50_000_017
    x = torch.randn(n, device="cuda").to(dtype)
    assert not has_inf_nan(x)
    for bad, pos in itertools.product([float("nan"), float("inf"), float("-inf")], [0, n // 3, n - 1]):
        y = x.clone()
        y[pos] = bad
        assert has_inf_nan(y), (dtype, bad, pos)
    flag = new_flag("cuda")
    check_inf_nan_(x, flag)
    assert flag.item() == 0
    if dtype is torch.float64:
        assert not has_inf_nan(torch.full((10,), 1e300, dtype=dtype, device="cuda"))


# --- vocab-parallel on 2 GPUs (NCCL) ----------------------------------------------------------


def _parallel_gpu_worker() -> int:
    ctx = bmt_comm.get_context()
    tp, dev = ctx.comms.tp, ctx.device
    c_local = 25_000
    cases = 0
    for i, (dtype, red, ls, hw) in enumerate(
        itertools.product([torch.bfloat16, torch.float16], ["none", "mean"], [0.0, 0.1], [False, True])
    ):
        x, t, w = _case(33, c_local * tp.size, dtype, 50 + i, hw, dev)
        xr = x.float().requires_grad_()
        ref = F.cross_entropy(xr, t, weight=w, reduction=red, label_smoothing=ls)
        shard = x[:, tp.rank * c_local : (tp.rank + 1) * c_local].clone().requires_grad_()
        loss = FusedCrossEntropy(weight=w, reduction=red, label_smoothing=ls, parallel=True)(shard, t)
        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
        go = torch.randn(ref.shape, generator=torch.Generator().manual_seed(i)).to(dev)
        loss.backward(go)
        ref.backward(go)
        assert shard.grad is not None and xr.grad is not None
        want = xr.grad[:, tp.rank * c_local : (tp.rank + 1) * c_local]
        torch.testing.assert_close(shard.grad.float(), want, rtol=ULP[dtype], atol=1e-6)
        cases += 1
    return cases


@pytest.mark.gpus(2)
@pytest.mark.world_size(2)
def test_vocab_parallel_nccl(spawn: Any) -> None:
    assert spawn(_parallel_gpu_worker, tp_size=2) == [16, 16]
