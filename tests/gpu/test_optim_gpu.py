"""bmt-optim's Adam optimizers on CUDA: the compiled Triton kernel and the offload pipeline.

Run on a GPU host: ``python -m pytest tests/gpu/test_optim_gpu.py -v``.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from bmt_optim import AdamOffloadOptimizer, AdamOptimizer
from bmt_optim.kernels_adam import AdamScalars, Backend, adam_update, adam_update_torch, triton_available

from ..optim._adam_reference import DTYPES, HP, SCALE, grads_for, make_params, master_of, run_ours
from ..optim.test_adam_offload import _train_gather_check

pytestmark = pytest.mark.gpu
TOL = dict(rtol=1e-6, atol=1e-6)
SHAPES = [(1_000_003,), (129, 65), (3,)]  # one flat shard with a ragged last block, and small ones


def _cuda(params: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(p.detach().cuda()) for p in params]


def _run_cuda(opt: torch.optim.Optimizer, params: list[torch.Tensor], first: int, last: int) -> None:
    for t in range(first, last + 1):
        for p, g in zip(params, grads_for(params, t), strict=True):
            p.grad = (g * SCALE).to(p.dtype).cuda()
        opt.step(scale=SCALE)  # type: ignore[call-arg]


@pytest.mark.skipif(not triton_available(), reason="triton is not installed on this GPU host")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_adam_matches_adamw(dtype: torch.dtype) -> None:
    cpu = make_params(SHAPES, dtype)
    gpu = _cuda(cpu)
    # decoupled: fp32 params take torch's AdamW (fp16/bf16 the Triton kernel, decoupled anyway)
    ours = AdamOptimizer(gpu, decoupled_weight_decay=True, **HP)  # type: ignore[arg-type]
    ref_params = [torch.nn.Parameter(p.detach().float().cuda()) for p in cpu]
    ref = torch.optim.AdamW(ref_params, fused=True, **HP)  # type: ignore[arg-type]
    for t in range(1, 21):
        _run_cuda(ours, gpu, t, t)
        for r, p in zip(ref_params, gpu, strict=True):
            r.grad = p.grad.float() / SCALE  # type: ignore[union-attr]
        ref.step()
    for p, r in zip(gpu, ref_params, strict=True):
        m = master_of(ours, p)
        torch.testing.assert_close(m, r.detach(), **TOL)
        assert torch.equal(p.detach(), m.to(dtype)), "the parameter is its master rounded (to nearest even)"


@pytest.mark.skipif(not triton_available(), reason="triton is not installed on this GPU host")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_kernel_equals_torch_path(dtype: torch.dtype) -> None:
    n = 3_000_001
    g = torch.Generator(device="cuda").manual_seed(0)
    p = torch.randn(n, device="cuda", generator=g).to(dtype)
    grad = (torch.randn(n, device="cuda", generator=g) * 100).to(dtype)
    m = torch.randn(n, device="cuda", generator=g) * 0.1
    v = torch.rand(n, device="cuda", generator=g) * 0.01
    master = None if dtype == torch.float32 else p.float()
    s = AdamScalars.make(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, step=5, scale=3.0, maximize=True)
    a = [x.clone() if x is not None else None for x in (p, master, m, v)]
    b = [x.clone() if x is not None else None for x in (p, master, m, v)]
    assert adam_update(a[0], grad, a[1], a[2], a[3], s) is Backend.TRITON  # type: ignore[arg-type]
    if b[1] is None:
        adam_update_torch(b[0], b[2], b[3], grad, None, s)  # type: ignore[arg-type]
    else:
        adam_update_torch(b[1], b[2], b[3], grad, b[0], s)  # type: ignore[arg-type]
    for x, y in zip(a[1:], b[1:], strict=True):
        if x is not None and y is not None:
            torch.testing.assert_close(x, y, **TOL)
    if master is not None:
        assert torch.equal(a[0], a[1].to(dtype))  # type: ignore[union-attr]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_offload_on_gpu_equals_offload_on_cpu(dtype: torch.dtype) -> None:
    """Same host arithmetic whatever the device: equal to the bit, through many small chunks,
    record_delta's statistics included."""
    cpu = make_params(SHAPES, dtype)
    gpu = _cuda(cpu)
    oc = AdamOffloadOptimizer(cpu, chunk_numel=100_000, record_delta=True, **HP)  # type: ignore[arg-type]
    og = AdamOffloadOptimizer(gpu, chunk_numel=100_000, record_delta=True, **HP)  # type: ignore[arg-type]
    run_ours(oc, cpu, 1, 5)
    _run_cuda(og, gpu, 1, 5)
    for p, q in zip(cpu, gpu, strict=True):
        for k in ("_param_fp32", "exp_avg", "exp_avg_sq", "_delta_info"):
            assert torch.equal(oc.state[p][k], og.state[q][k]), k
        assert torch.equal(p.detach(), q.detach().cpu())
    assert oc.get_avg_delta() == og.get_avg_delta() != 0.0
    assert oc.get_var_delta() == og.get_var_delta() > 0.0


def test_offload_orders_against_the_callers_stream() -> None:
    """Gradients written by queued work are what D2H reads; work queued after step sees new params."""
    (p,) = _cuda(make_params([(4_000_000,)], torch.bfloat16))
    (twin,) = make_params([(4_000_000,)], torch.bfloat16)
    opt = AdamOffloadOptimizer([p], chunk_numel=500_000, **HP)  # type: ignore[arg-type]
    ref = AdamOffloadOptimizer([twin], chunk_numel=500_000, **HP)  # type: ignore[arg-type]
    for t in range(1, 4):
        g = (grads_for([twin], t)[0] * SCALE).to(torch.bfloat16)
        twin.grad = g
        ref.step(scale=SCALE)
        p.grad = torch.zeros_like(p)
        torch.cuda._sleep(200_000_000)  # keep the stream busy: a missing wait would read zero gradients
        p.grad.copy_(g.cuda(non_blocking=True))
        opt.step(scale=SCALE)
        seen = p.detach().clone()  # queued on the caller's stream right after step
        assert torch.equal(seen.cpu(), twin.detach()), t


@pytest.mark.gpus(2)
@pytest.mark.world_size(2)
def test_gathered_offload_state_over_nccl(spawn: Any, tmp_path: Any) -> None:
    """The CPU test's gather/reload check with CUDA shards and NCCL (world 2)."""
    assert all(spawn(_train_gather_check, str(tmp_path / "a.pt"), 1, 3, None))
