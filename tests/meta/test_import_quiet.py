"""Importing bmtrain on a machine without CUDA works and prints nothing (no warnings either)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


@pytest.mark.parametrize("module", ["bmtrain", "bmtrain.benchmark", "bmtrain.examples.train"])
def test_import_prints_nothing(module: str) -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # as on a host without GPUs
    env.pop("PYTHONWARNINGS", None)
    proc = subprocess.run(
        [sys.executable, "-c", f"import {module}"], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr == ""


def test_import_has_no_warnings_even_when_shown() -> None:
    """With ``-W always`` every warning is shown, deprecations included: there must be none."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, "-W", "always", "-c", "import bmtrain, bmtrain.benchmark, bmtrain.examples.train"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
