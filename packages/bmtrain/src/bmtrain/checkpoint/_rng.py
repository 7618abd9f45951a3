"""Every random number generator a training step may draw from, as plain data.

Python ``random``, NumPy's global generator, torch's CPU generator and the CUDA generator of this
rank's device. Stored as tensors, ints and floats only, so ``torch.load(weights_only=True)`` reads
them back.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

__all__ = ["capture_rng", "restore_rng"]


def capture_rng(device: torch.device) -> dict[str, Any]:
    name, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)  # type: ignore[misc]
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"name": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
        "cuda": None,
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _tuples(x: Any) -> Any:
    """Python's state as ``random.setstate`` wants it (tuples, also after a round trip as lists)."""
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def restore_rng(state: dict[str, Any], device: torch.device) -> list[str]:
    """Set every generator saved in ``state``; the names of those set."""
    done = []
    random.setstate(_tuples(state["python"]))
    done.append("python")
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    done.append("numpy")
    torch.set_rng_state(state["torch"])
    done.append("torch")
    if state.get("cuda") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
        done.append("cuda")
    return done
