"""inf/nan check: torch path on CPU here, the Triton kernel under its interpreter."""

from __future__ import annotations

import pytest
import torch
from bmt_optim._triton_support import Backend, backend_for
from bmt_optim.nan_check import check_inf_nan_, has_inf_nan, new_flag

from .interpret import needs_triton, run_interpreted

FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def _check_float_dtypes(n: int) -> None:
    """Every float dtype, each bad value, at the first, a middle and the last position."""
    for dtype in FLOATS:
        x = torch.randn(n, dtype=torch.float32).to(dtype) * 100
        assert not has_inf_nan(x), dtype
        for bad in (float("nan"), float("inf"), float("-inf")):
            for pos in (0, n // 2 + 1, n - 1):
                y = x.clone()
                y[pos] = bad
                assert has_inf_nan(y), (dtype, bad, pos)
    big = torch.full((n,), torch.finfo(torch.float64).max, dtype=torch.float64)
    assert not has_inf_nan(big)  # fp64 values above fp32's range are finite
    half_max = torch.full((n,), torch.finfo(torch.float16).max, dtype=torch.float16)
    assert not has_inf_nan(half_max)


def _check_flag_accumulates() -> None:
    flag = new_flag("cpu")
    check_inf_nan_(torch.ones(100), flag)
    assert flag.item() == 0
    bad = torch.ones(100)
    bad[3] = float("nan")
    check_inf_nan_(bad, flag)
    check_inf_nan_(torch.ones(100), flag)  # a clean tensor later does not clear it
    assert flag.item() == 1


def interpreted_main() -> None:
    """Run by test_triton_kernel_interpreted in a TRITON_INTERPRET=1 process."""
    assert backend_for(torch.ones(1)) is Backend.TRITON
    _check_float_dtypes(3 * 4096 + 17)  # several programs and a partial last block
    _check_flag_accumulates()
    print("ok")


def test_float_dtypes() -> None:
    assert backend_for(torch.ones(1)) is Backend.TORCH
    _check_float_dtypes(1000)


def test_flag_accumulates_without_reset() -> None:
    _check_flag_accumulates()


def test_other_dtypes_and_shapes() -> None:
    assert not has_inf_nan(torch.empty(0))
    assert not has_inf_nan(torch.arange(10))
    assert not has_inf_nan(torch.ones(3, dtype=torch.bool))
    z = torch.ones(4, dtype=torch.complex64)
    assert not has_inf_nan(z)
    z[2] = complex(0.0, float("inf"))
    assert has_inf_nan(z)
    x = torch.ones(6, 8)
    x[5, 0] = float("nan")
    assert has_inf_nan(x.t())  # non-contiguous
    assert not has_inf_nan(x[:5])
    assert has_inf_nan(torch.tensor(float("-inf")))  # 0-dim
    f8 = torch.ones(5).to(torch.float8_e4m3fn)
    assert not has_inf_nan(f8)
    f8[1] = float("nan")
    assert has_inf_nan(f8)


def test_bad_flag() -> None:
    with pytest.raises(TypeError, match="int32"):
        check_inf_nan_(torch.ones(2), torch.zeros(1))
    with pytest.raises(TypeError, match="1-element"):
        check_inf_nan_(torch.ones(2), torch.zeros(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="meta"):
        check_inf_nan_(torch.ones(2), new_flag("meta"))


@needs_triton
def test_triton_kernel_interpreted() -> None:
    assert "ok" in run_interpreted("tests.optim.test_nan_check", "interpreted_main")
