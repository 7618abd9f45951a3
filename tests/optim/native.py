"""Whether the C++ CPU Adam must be tested here: skipped only where it cannot have been built."""

from __future__ import annotations

import os
import shutil

import pytest
from bmt_optim.cpu_adam import native_available, native_error

# A C++ compiler on this machine means the build hook should have built the extension: a missing
# one is then a broken build, and the tests fail instead of skipping quietly.
_COMPILER = next((c for c in (os.environ.get("CXX"), "c++", "g++", "clang++") if c and shutil.which(c)), None)
_OPTED_OUT = os.environ.get("BMT_OPTIM_NO_EXT") == "1"

_CANNOT_BUILD = _COMPILER is None or _OPTED_OUT
NATIVE_EXPECTED = native_available() or not _CANNOT_BUILD  # the C++ kernel is to be tested here
_SKIP_REASON = "the C++ CPU Adam was not built: no C++ compiler here (or BMT_OPTIM_NO_EXT=1)"

requires_native = pytest.mark.skipif(not native_available() and _CANNOT_BUILD, reason=_SKIP_REASON)


def check_native_built() -> None:
    """Skip where the extension cannot have been built; fail, with the fix, where it should have been."""
    if native_available():
        return
    if _CANNOT_BUILD:
        pytest.skip(_SKIP_REASON)
    pytest.fail(
        f"a C++ compiler ({_COMPILER}) is here but bmt_optim._cpu_adam is not importable "
        f"({native_error()}): rebuild with `pip install -e packages/bmt-optim --no-deps` or "
        "`python packages/bmt-optim/hatch_build.py --force` (`hatch run test` does the latter)"
    )
