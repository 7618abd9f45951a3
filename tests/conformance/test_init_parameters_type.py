"""``bmt.init_parameters`` decides what a Block is by type, as 1.0.1 does (``isinstance(module,
Block)``), never by method name: a user's DistributedModule with a method called
``init_parameters`` is walked like any module (its parameters initialised, its method not
called); a Block initialises its own parameters. Values are compared with plain torch drawing
the same initialisers in the same order from the same seed (exactly equal), at world 1 and 2.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

# (name, shape, initialiser, its keyword arguments), in the order init_parameters visits them
SPECS = [
    ("w", (6, 5), torch.nn.init.normal_, {"std": 0.5}),
    ("b", (5,), torch.nn.init.uniform_, {"a": -1.0, "b": 1.0}),
    ("v", (3, 4), torch.nn.init.xavier_uniform_, {}),
]
MODULES = ("user", "block", "nested.user")  # named_modules order of the parameters' owners


def _reference() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    out = {}
    for module in MODULES:
        for name, shape, init, kwargs in SPECS:
            t = torch.empty(shape)
            init(t, **kwargs)
            out[f"{module}.{name}"] = t
    return out


def _build() -> torch.nn.Module:
    import bmtrain as bmt

    class UserLayer(bmt.DistributedModule):
        """A user's module with its own method named init_parameters (not bmt's business)."""

        def __init__(self) -> None:
            super().__init__()
            for name, shape, init, kwargs in SPECS:
                setattr(self, name, bmt.DistributedParameter(shape, init_method=bmt.ParameterInitializer(init, **kwargs)))
            self.calls = 0

        def init_parameters(self) -> None:
            self.calls += 1

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    class Nested(bmt.DistributedModule):
        def __init__(self) -> None:
            super().__init__()
            self.user = UserLayer()

    class Root(bmt.DistributedModule):
        def __init__(self) -> None:
            super().__init__()
            self.user = UserLayer()
            self.block = bmt.Block(UserLayer())
            self.nested = Nested()

    return Root()


def _run() -> dict[str, Any]:
    import bmt_comm
    import bmtrain as bmt
    from bmt_zero import BlockType
    from bmt_zero.grouping import grouped_parameters

    model = _build()
    assert isinstance(model.block, BlockType) and not isinstance(model.user, BlockType)
    torch.manual_seed(0)
    bmt.init_parameters(model)
    assert model.user.calls == 0 and model.nested.user.calls == 0, "a user's init_parameters method was called"
    assert model.block._module.calls == 0, "the Block ran its inner module's own method"
    # the user's module is not a Block to grouped_parameters either: its parameters are listed
    listed = {id(p) for _, ps in grouped_parameters(model) for p in ps}
    assert all(id(p) in listed for p in model.user.parameters())
    state = model.state_dict()
    return {k: v.numpy() for k, v in state.items()} if bmt_comm.rank() == 0 else {}


@pytest.mark.parametrize("world_size", [1, 2])
def test_init_parameters_by_type_not_method_name(spawn: Any, world_size: int) -> None:
    got = spawn(_run)[0]
    want = _reference()
    assert list(got) == list(want), list(got)
    for key, value in want.items():
        assert torch.equal(torch.from_numpy(got[key]), value), key
