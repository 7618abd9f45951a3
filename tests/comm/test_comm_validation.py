"""init_distributed checks each argument by name before it sets anything up."""

from __future__ import annotations

import datetime

import numpy as np
import pytest
from bmt_comm.arguments import check_init_arguments


def _check(**kw: object):  # type: ignore[no-untyped-def]
    args = {"init_method": "env://", "seed": 0, "pipe_size": -1, "num_micro_batches": None, "tp_size": 1,
            "timeout": None}
    args.update(kw)
    return check_init_arguments(**args)


@pytest.mark.parametrize(
    ("kw", "error", "message"),
    [
        ({"seed": "abc"}, TypeError, "init_distributed(seed=...) must be an int, got str 'abc'"),
        ({"seed": None}, TypeError, "init_distributed(seed=...) must be an int, got NoneType None"),
        ({"seed": 1.5}, TypeError, "init_distributed(seed=...) must be an int, got float 1.5"),
        ({"seed": -1}, ValueError, "init_distributed(seed=...) must be in [0, 2**32), got -1"),
        ({"seed": 2**32}, ValueError, "must be in [0, 2**32), got 4294967296"),
        ({"tp_size": "2"}, TypeError, "init_distributed(tp_size=...) must be an int, got str '2'"),
        ({"tp_size": 2.0}, TypeError, "init_distributed(tp_size=...) must be an int, got float 2.0"),
        ({"tp_size": -2}, ValueError, "init_distributed(tp_size=...) must be >= 1, or 0/-1 for off, got -2"),
        ({"pipe_size": -3}, ValueError, "init_distributed(pipe_size=...) must be >= 1, or 0/-1 for off, got -3"),
        ({"pipe_size": "4"}, TypeError, "init_distributed(pipe_size=...) must be an int, got str '4'"),
        ({"num_micro_batches": -1}, ValueError, "init_distributed(num_micro_batches=...) must be >= 1"),
        ({"num_micro_batches": 2.5}, TypeError, "init_distributed(num_micro_batches=...) must be an int"),
        ({"init_method": None}, TypeError, "init_distributed(init_method=...) must be a str"),
        ({"timeout": -1}, ValueError, "init_distributed(timeout=...) must be a positive number of seconds, got -1"),
        ({"timeout": "10"}, TypeError, "init_distributed(timeout=...) must be seconds"),
    ],
)
def test_bad_arguments_are_named(kw: dict[str, object], error: type[Exception], message: str) -> None:
    with pytest.raises(error) as info:
        _check(**kw)
    assert message in str(info.value)


def test_values_1_0_1_accepted_keep_working() -> None:
    a = _check()
    assert (a.pipe_size, a.pipe_enabled, a.tp_size, a.num_micro_batches, a.seed) == (1, False, 1, None, 0)
    assert a.timeout == datetime.timedelta(seconds=1800) and not a.timeout_given
    assert (_check(pipe_size=0).pipe_size, _check(pipe_size=0).pipe_enabled) == (1, False)
    assert (_check(pipe_size=1).pipe_size, _check(pipe_size=1).pipe_enabled) == (1, True)  # 1.0.1: enabled
    assert _check(tp_size=0).tp_size == _check(tp_size=-1).tp_size == 1  # 1.0.1 turned <= 0 into 1
    assert _check(num_micro_batches=0).num_micro_batches is None  # 1.0.1: falsy meant one per stage
    assert _check(seed=np.int64(7)).seed == 7 and isinstance(_check(seed=np.int64(7)).seed, int)
    assert _check(seed=2**32 - 1).seed == 2**32 - 1
    assert _check(tp_size=np.int32(2)).tp_size == 2
    assert _check(timeout=5).timeout_given


def _noop() -> None:
    return None


def test_init_distributed_validates_before_touching_anything() -> None:
    import bmt_comm

    with pytest.raises(TypeError, match=r"init_distributed\(seed=...\) must be an int, got str 'abc'"):
        bmt_comm.init_distributed(seed="abc")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"tp_size=...\) must be >= 1, or 0/-1 for off, got -2"):
        bmt_comm.init_distributed(tp_size=-2)
    assert not bmt_comm.is_initialized()
