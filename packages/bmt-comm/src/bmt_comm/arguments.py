"""``init_distributed``'s arguments, checked by name before anything is set up.

What 1.0.1 accepted keeps working: ``pipe_size`` 0 or -1 (the default) means no pipeline,
``tp_size`` 0 or -1 means no tensor parallelism (1.0.1 turned any ``tp_size <= 0`` into 1),
``num_micro_batches`` None or 0 means one per stage. Values 1.0.1 only accepted by accident are
refused with the rule: ``tp_size``/``pipe_size`` below -1, non-integers, negative seeds (numpy's
seeding refused them in 1.0.1 too), a non-string ``init_method``.
"""

from __future__ import annotations

import datetime
import operator
import os
from dataclasses import dataclass
from typing import Any

from .timeouts import ENV_VAR, resolve_timeout

__all__ = ["InitArguments", "check_init_arguments"]

_SEED_LIMIT = 2**32  # numpy's np.random.seed range, which 1.0.1 also called


@dataclass(frozen=True)
class InitArguments:
    init_method: str
    seed: int
    pipe_size: int  # >= 1
    pipe_enabled: bool  # pipe_size > 0 was passed, even 1
    tp_size: int  # >= 1
    num_micro_batches: int | None  # >= 1, or None for one per stage
    timeout: datetime.timedelta
    timeout_given: bool  # by the keyword or BMT_TIMEOUT: bmt's groups get it even in a user's world


def _integer(name: str, value: Any) -> int:
    """An int (or numpy integer); bool and float are refused: ``tp_size=2.0`` is a mistake."""
    if isinstance(value, (bool, float)):
        raise TypeError(f"init_distributed({name}=...) must be an int, got {type(value).__name__} {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"init_distributed({name}=...) must be an int, got {type(value).__name__} {value!r}") from None


def _size(name: str, value: Any) -> tuple[int, bool]:
    """A parallel size: (the size, whether it was switched on). -1 and 0 mean off, as in 1.0.1."""
    size = _integer(name, value)
    if size < -1:
        raise ValueError(f"init_distributed({name}=...) must be >= 1, or 0/-1 for off, got {size}")
    return (size, True) if size >= 1 else (1, False)


def check_init_arguments(
    init_method: Any,
    seed: Any,
    pipe_size: Any,
    num_micro_batches: Any,
    tp_size: Any,
    timeout: Any,
) -> InitArguments:
    if not isinstance(init_method, str):
        raise TypeError(
            "init_distributed(init_method=...) must be a str such as 'env://' or 'tcp://host:port', "
            f"got {type(init_method).__name__} {init_method!r}"
        )
    if seed is None or isinstance(seed, (bool, float, str)):
        raise TypeError(f"init_distributed(seed=...) must be an int, got {type(seed).__name__} {seed!r}")
    seed_int = _integer("seed", seed)
    if not 0 <= seed_int < _SEED_LIMIT:
        raise ValueError(f"init_distributed(seed=...) must be in [0, 2**32), got {seed_int}")
    pipe, pipe_enabled = _size("pipe_size", pipe_size)
    tp, _ = _size("tp_size", tp_size)
    micros: int | None = None
    if num_micro_batches is not None:
        micros = _integer("num_micro_batches", num_micro_batches)
        if micros < 0:
            raise ValueError(
                f"init_distributed(num_micro_batches=...) must be >= 1 (or None/0 for one per stage), got {micros}"
            )
        micros = micros or None  # 1.0.1: a falsy value meant the default
    given = timeout is not None
    resolved = resolve_timeout(timeout)
    if not given:
        given = bool(os.environ.get(ENV_VAR, "").strip())
    return InitArguments(init_method, seed_int, pipe, pipe_enabled, tp, micros, resolved, given)
