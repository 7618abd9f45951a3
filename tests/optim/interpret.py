"""Run a check function in a fresh interpreter with ``TRITON_INTERPRET=1``.

Triton decides at decoration time whether a kernel is compiled or interpreted, so the kernels
must be imported in a process that has the variable set from the start.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None,
    reason="triton is not installed: the Triton kernels' arithmetic is checked only where it is "
    "(pip install 'triton==3.9.*' runs them on CPU through TRITON_INTERPRET=1)",
)


def run_interpreted(module: str, function: str, timeout: float = 240.0) -> str:
    """``module.function()`` under the Triton interpreter; fails the test with its output."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    code = f"import {module} as m; m.{function}()"
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        pytest.fail(f"{module}.{function} under TRITON_INTERPRET=1 failed:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout
