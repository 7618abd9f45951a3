"""bmtrain.debug: the process-wide scratch dictionary."""

from __future__ import annotations

import pytest
import torch


def test_set_get_clear_append_extend() -> None:
    from bmtrain import debug

    debug.clear()
    t = torch.ones(3, requires_grad=True)
    debug.set("t", t * 2)
    stored = debug.get("t")
    assert isinstance(stored, torch.Tensor) and not stored.requires_grad and stored.device.type == "cpu"
    with torch.no_grad():
        t.add_(1)
    assert torch.equal(stored, torch.full((3,), 2.0))  # a snapshot, not a view
    debug.set("n", 5)
    assert debug.get("n") == 5 and debug.get("missing") is None and debug.get("missing", 7) == 7
    debug.append("list", 1)
    debug.extend("list", [2, 3])
    assert debug.get("list") == [1, 2, 3]
    with pytest.raises(TypeError, match="list"):
        debug.append("n", 1)
    debug.clear("n")
    debug.clear("never-set")
    assert debug.get("n") is None and debug.get("list") == [1, 2, 3]
    debug.clear()
    assert debug.get("list") is None and debug.get("t") is None
