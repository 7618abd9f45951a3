"""The non-finite guard on CUDA (one process): the fused multi-tensor check and a skipped step.

Run on a GPU host: ``python -m pytest tests/gpu/test_nonfinite_guard_gpu.py -v``.
Tolerances against ``torch.optim.AdamW(fused=True)``: rtol=1e-5, atol=1e-6 on fp32 values.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from bmt_optim import AdamOffloadOptimizer, AdamOptimizer, NonFiniteGradientWarning, OptimManager
from bmt_optim._triton_support import triton_available
from bmt_optim.nan_check import check_inf_nan_many_, has_inf_nan, new_flag

from ..optim.test_nonfinite_guard import HP, TOL, _assert_same, _master, _snapshot

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not triton_available(), reason="triton is not installed on this GPU host"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_fused_check_matches_per_tensor_and_does_not_sync(dtype: torch.dtype) -> None:
    from bmt_optim._nan_kernels import MULTI_CHUNK

    g = torch.Generator(device="cuda").manual_seed(0)
    big = torch.randn(5 * MULTI_CHUNK + 7, device="cuda", generator=g).to(dtype)
    sizes = [1, 3, MULTI_CHUNK - 1, MULTI_CHUNK, MULTI_CHUNK + 1, 1000, 4096 * 3 + 5] * 40  # 280 tensors
    ts = [torch.randn(n, device="cuda", generator=g).to(dtype) for n in sizes]
    ts += [big[MULTI_CHUNK + 3 : 3 * MULTI_CHUNK], big[11:MULTI_CHUNK], big[3 * MULTI_CHUNK + 1 :]]  # views, one below another
    flag = check_inf_nan_many_(ts, new_flag("cuda"))
    assert flag.item() == 0
    torch.cuda.set_sync_debug_mode("error")  # the table is cached now: the check itself never syncs
    try:
        check_inf_nan_many_(ts, new_flag("cuda"))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    gen = torch.Generator().manual_seed(1)
    for trial in range(60):
        i = int(torch.randint(len(ts), (1,), generator=gen))
        t = ts[i]
        pos = [0, t.numel() - 1, int(torch.randint(t.numel(), (1,), generator=gen))][trial % 3]
        old = t[pos].clone()
        t[pos] = (float("nan"), float("inf"), float("-inf"))[trial % 3]
        assert has_inf_nan(t)
        assert check_inf_nan_many_(ts, new_flag("cuda")).item() == 1, (i, pos)
        t[pos] = old
    big[3 * MULTI_CHUNK] = float("nan")  # between two views: checked by none
    assert check_inf_nan_many_(ts, new_flag("cuda")).item() == 0


def _params(dtype: torch.dtype, seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(n, generator=g).to(dtype).cuda()) for n in (1_000_003, 4096, 3, 70_000)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("opt_cls", [AdamOptimizer, AdamOffloadOptimizer], ids=lambda c: c.__name__)
def test_skip_on_cuda_matches_adamw_that_skipped(dtype: torch.dtype, opt_cls: Any) -> None:
    ps = _params(dtype)
    ref = [torch.nn.Parameter(p.detach().float().clone()) for p in ps]
    opt = opt_cls(ps, decoupled_weight_decay=True, **HP)  # AdamW for every dtype, like the reference
    m = OptimManager()
    m.add_optimizer(opt)
    ref_opt = torch.optim.AdamW(ref, fused=True, **HP)  # type: ignore[arg-type]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for t in range(1, 6):
            g = torch.Generator().manual_seed(100 + t)
            grads = [torch.randn(p.shape, generator=g).to(dtype).cuda() for p in ps]
            for p, gr in zip(ps, grads, strict=True):
                p.grad = gr.clone()
            if t in (2, 4):
                ps[t % 3].grad[-1] = float("nan") if t == 2 else float("inf")  # type: ignore[index]
                before = _snapshot(m, ps)
                assert not m.step(), t
                _assert_same(before, _snapshot(m, ps), f"step {t}")
                continue
            assert m.step(), t
            for r, gr in zip(ref, grads, strict=True):
                r.grad = gr.float()
            ref_opt.step()
            for p, r in zip(ps, ref, strict=True):
                torch.testing.assert_close(_master(opt, p).cuda(), r.detach(), **TOL)
                assert torch.equal(p.detach(), _master(opt, p).cuda().to(dtype))
    assert len([w for w in caught if w.category is NonFiniteGradientWarning]) == 1
    assert (m.skipped_steps, m.step_count) == (2, 5)
