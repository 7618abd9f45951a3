"""FusedCrossEntropy against torch.nn.functional.cross_entropy on fp32 copies of the logits.

Tolerances: losses are computed in fp32 on both sides (rtol 1e-5); gradients are written in the
logits' dtype, so they are compared with torch's fp32 gradient to one unit in the last place of
that dtype (2**-7 relative for bf16, 2**-10 for fp16).
"""

from __future__ import annotations

import itertools
from typing import Any

import bmt_comm
import pytest
import torch
import torch.nn.functional as F
from bmt_optim._triton_support import Backend, backend_for
from bmt_optim.loss import FusedCrossEntropy, _ce_torch

from .interpret import needs_triton, run_interpreted

ULP = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7, torch.float32: 1e-6}


def _case(n: int, c: int, dtype: torch.dtype, seed: int, hw: bool) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, c, generator=g) * 4).to(dtype)
    x[1, 5:] = float("-inf")  # a row with a masked-out vocabulary
    t = torch.randint(0, c, (n,), generator=g)
    t[::4] = -100
    t[1] = 2  # the target of the masked row is still reachable
    w = torch.rand(c, generator=g) + 0.1 if hw else None
    return x, t, w


def _reference(x: torch.Tensor, t: torch.Tensor, w: torch.Tensor | None, **kw: Any) -> tuple[torch.Tensor, ...]:
    xr = x.detach().float().clone().requires_grad_()
    loss = F.cross_entropy(xr, t, weight=w, **kw)
    return loss, xr


def _assert_grad(ours: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    assert ours.dtype == dtype, what
    torch.testing.assert_close(ours.float(), ref, rtol=ULP[dtype], atol=1e-6, msg=lambda m, what=what: f"{what}: {m}")


def check_matrix(n: int, c: int, dtypes: list[torch.dtype], full: bool = True) -> int:
    """Every reduction x label smoothing x weight x dtype; returns the number of cases."""
    cases = 0
    combos = itertools.product(dtypes, ["none", "sum", "mean"], [0.0, 0.15], [False, True])
    for i, (dtype, red, ls, hw) in enumerate(combos):
        if not full and (ls > 0) != hw:
            continue
        x, t, w = _case(n, c, dtype, i, hw)
        ref_loss, xr = _reference(x, t, w, reduction=red, label_smoothing=ls)
        xa = x.clone().requires_grad_()
        loss = FusedCrossEntropy(weight=w, reduction=red, label_smoothing=ls)(xa, t)
        what = f"{dtype} reduction={red} smoothing={ls} weight={hw}"
        assert loss.dtype == torch.float32, what
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6, msg=lambda m, what=what: f"{what}: {m}")
        go = torch.randn_like(ref_loss)
        loss.backward(go)
        ref_loss.backward(go)
        assert xa.grad is not None and xr.grad is not None
        _assert_grad(xa.grad, xr.grad, dtype, what)
        cases += 1
    return cases


def check_edge_cases(c: int) -> None:
    """All-ignored batches, a custom ignore_index, in-place gradients, out-of-range targets."""
    for red, dtype in itertools.product(["none", "sum", "mean"], [torch.float16, torch.bfloat16]):
        x = torch.randn(5, c).to(dtype).requires_grad_()
        t = torch.full((5,), -100)
        loss = FusedCrossEntropy(reduction=red, label_smoothing=0.1)(x, t)
        ref = F.cross_entropy(x.detach().float(), t, reduction=red, label_smoothing=0.1)
        torch.testing.assert_close(loss, ref, equal_nan=True)  # mean: nan like torch, sum 0, none 0s
        loss.sum().backward()
        assert x.grad is not None and torch.equal(x.grad, torch.zeros_like(x))

    x, t, _ = _case(6, c, torch.bfloat16, 99, False)
    t[t == -100] = 3
    t[2] = 3
    ref_loss, xr = _reference(x, t, None, ignore_index=3)
    xa = x.clone().requires_grad_()
    loss = FusedCrossEntropy(ignore_index=3)(xa, t)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    loss.backward()
    ref_loss.backward()
    assert xa.grad is not None and xr.grad is not None
    _assert_grad(xa.grad, xr.grad, torch.bfloat16, "ignore_index=3")

    # inplace: the gradient lands in the logits' own buffer
    x, t, _ = _case(6, c, torch.float16, 7, False)
    leaf = x.clone().requires_grad_()
    logits = leaf * 1.0  # a non-leaf, as a projection's output would be
    buffer = logits.detach()
    FusedCrossEntropy(inplace=True)(logits, t).backward()
    ref_loss, xr = _reference(x, t, None)
    ref_loss.backward()
    assert xr.grad is not None and leaf.grad is not None
    _assert_grad(buffer, xr.grad, torch.float16, "inplace buffer")
    _assert_grad(leaf.grad, xr.grad, torch.float16, "inplace grad")

    empty = torch.zeros(0, c, dtype=torch.float16, requires_grad=True)
    for red in ("none", "sum", "mean"):
        loss = FusedCrossEntropy(reduction=red)(empty, torch.zeros(0, dtype=torch.long))
        ref = F.cross_entropy(empty.detach().float(), torch.zeros(0, dtype=torch.long), reduction=red)
        torch.testing.assert_close(loss, ref, equal_nan=True)  # an empty batch: [], 0, nan
        loss.sum().backward()

    for bad in (c, -1, -101):
        t = torch.zeros(4, dtype=torch.long)
        t[2] = bad
        with pytest.raises(ValueError, match=rf"target {bad} at row 2 is out of range \[0, {c}\)"):
            FusedCrossEntropy()(torch.randn(4, c).half(), t)


def interpreted_main() -> None:
    """Run by test_triton_kernels_interpreted in a TRITON_INTERPRET=1 process."""
    from bmt_optim.loss import _ce_triton

    assert backend_for(torch.ones(1)) is Backend.TRITON
    _ce_triton.MAX_BLOCK = 64  # 300 columns: 5 blocks, 2 vocabulary splits of 3 and 2 blocks
    _ce_triton.TARGET_PROGRAMS = 10
    assert check_matrix(5, 300, [torch.float16, torch.bfloat16], full=False) == 12
    check_edge_cases(70)
    print("ok")


def test_half_inputs_match_torch() -> None:
    assert backend_for(torch.ones(1)) is Backend.TORCH
    assert check_matrix(37, 1000, [torch.float16, torch.bfloat16]) == 24


def test_torch_path_in_small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_ce_torch, "_COLS", 64)  # 300 columns in 5 blocks, 4 rows at a time
    monkeypatch.setattr(_ce_torch, "_ELEMS", 256)
    assert check_matrix(9, 300, [torch.bfloat16], full=False) == 6


def test_edge_cases() -> None:
    check_edge_cases(70)


def test_fp32_input_is_torch_cross_entropy() -> None:
    x, t, w = _case(8, 50, torch.float32, 3, True)
    x.requires_grad_()
    for red in ("none", "sum", "mean"):
        ours = FusedCrossEntropy(weight=w, reduction=red, label_smoothing=0.2)(x, t)
        assert torch.equal(ours, F.cross_entropy(x, t, weight=w, reduction=red, label_smoothing=0.2))


def test_module_and_bad_input() -> None:
    w = torch.rand(10)
    mod = FusedCrossEntropy(weight=w, reduction="sum").to(torch.float64)
    assert mod.weight is not None and mod.weight.dtype == torch.float64  # a buffer: follows .to()
    assert "reduction=sum" in repr(mod)
    x, t = torch.randn(4, 10).half(), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="reduction must be one of"):
        FusedCrossEntropy(reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing"):
        FusedCrossEntropy(label_smoothing=1.5)
    with pytest.raises(ValueError, match="2-D"):
        FusedCrossEntropy()(x[None], t)
    with pytest.raises(ValueError, match="1-D with N = 4"):
        FusedCrossEntropy()(x, t[:3])
    with pytest.raises(TypeError, match="integer dtype"):
        FusedCrossEntropy()(x, t.float())
    with pytest.raises(ValueError, match=r"one entry per class \(10\)"):
        FusedCrossEntropy(weight=torch.ones(9))(x, t)


# --- vocab-parallel ----------------------------------------------------------------------


def _parallel_worker() -> int:
    ctx = bmt_comm.get_context()
    tp = ctx.comms.tp
    assert tp.size == 2
    cases = 0
    c_local = 150
    c = c_local * tp.size
    combos = itertools.product(
        [torch.float16, torch.bfloat16, torch.float32], ["none", "sum", "mean"], [0.0, 0.1], [False, True]
    )
    for i, (dtype, red, ls, hw) in enumerate(combos):
        if dtype is torch.float32 and (ls > 0) != hw:
            continue
        # same seed on every rank: every rank knows the full logits and slices its shard
        x, t, w = _case(11, c, dtype, 1000 + i, hw)
        t[3] = c - 1  # a target in the last shard
        t[5] = 0
        ref_loss, xr = _reference(x, t, w, reduction=red, label_smoothing=ls)
        shard = x[:, tp.rank * c_local : (tp.rank + 1) * c_local].clone().requires_grad_()
        loss = FusedCrossEntropy(weight=w, reduction=red, label_smoothing=ls, parallel=True)(shard, t)
        what = f"tp rank {tp.rank}: {dtype} reduction={red} smoothing={ls} weight={hw}"
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6, msg=lambda m, what=what: f"{what}: {m}")
        go = torch.randn(ref_loss.shape, generator=torch.Generator().manual_seed(i))
        loss.backward(go)
        ref_loss.backward(go)
        assert shard.grad is not None and xr.grad is not None
        _assert_grad(shard.grad, xr.grad[:, tp.rank * c_local : (tp.rank + 1) * c_local], dtype, what)
        cases += 1
    t = torch.zeros(4, dtype=torch.long)
    t[1] = c  # global ids: c_local is valid here, c is not
    with pytest.raises(ValueError, match=rf"out of range \[0, {c}\)"):
        FusedCrossEntropy(parallel=True)(torch.randn(4, c_local).half(), t)
    return cases


@pytest.mark.parametrize("world_size", [2, 4])
def test_vocab_parallel_matches_full_logits(spawn: Any, world_size: int) -> None:
    assert spawn(_parallel_worker, tp_size=2) == [30] * world_size  # 12 fp16 + 12 bf16 + 6 fp32 cases


@needs_triton
def test_triton_kernels_interpreted() -> None:
    assert "ok" in run_interpreted("tests.optim.test_cross_entropy", "interpreted_main")
