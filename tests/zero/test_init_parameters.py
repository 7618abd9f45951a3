"""init_parameters: the same values at every world size; grouped_parameters."""

from __future__ import annotations

import pytest
import torch

# (name, shape, init) -- xavier needs the full shape (fan in/out), so a shard-only init would differ
SPECS = [
    ("a", (13, 7), ("normal_", {"std": 0.02})),
    ("b", (3,), ("uniform_", {"a": -1.0, "b": 1.0})),
    ("c", (5, 9), ("xavier_normal_", {})),
    ("d", (1,), ("constant_", {"val": 0.25})),
    ("e", (2, 3, 4), ("kaiming_uniform_", {"a": 5**0.5})),
    ("f", (4,), None),  # no init_method: keeps its construction values
]


def _reference() -> dict[str, torch.Tensor]:
    """One process, plain torch: the same seed, the same order."""
    torch.manual_seed(0)
    torch.nn.Linear(2, 2)  # the model's plain Linear draws its default init at construction
    out = {}
    for name, shape, init in SPECS:
        t = torch.arange(float(torch.Size(shape).numel())).view(shape) if init is None else torch.empty(shape)
        if init is not None:
            getattr(torch.nn.init, init[0])(t, **init[1])
        out[name] = t
    return out


def _build():  # noqa: ANN202 - returns the test's model classes
    from bmt_zero import DistributedModule, DistributedParameter, ParameterInitializer

    class Leaf(DistributedModule):
        def __init__(self, specs: list) -> None:
            super().__init__()
            for name, shape, init in specs:
                if init is None:
                    p = DistributedParameter(torch.arange(float(torch.Size(shape).numel())).view(shape))
                else:
                    method = ParameterInitializer(getattr(torch.nn.init, init[0]), **init[1])
                    p = DistributedParameter(shape, init_method=method, group="g" if name in "ce" else None)
                setattr(self, name, p)

    from bmt_zero import BlockType

    @BlockType.register
    class FakeBlock(torch.nn.Module):
        """A registered Block type: initialises its own parameters, exposes flat storage."""

        def __init__(self) -> None:
            super().__init__()
            self.inner = torch.nn.Parameter(torch.zeros(3))
            self.inner._in_block = True  # a view into the flat storage below
            self.flat = torch.nn.Parameter(torch.zeros(8))
            self.calls = 0

        def init_parameters(self) -> None:
            self.calls += 1

        def grouped_parameters(self):  # noqa: ANN202
            yield "blockgroup", [self.flat]

    class Root(DistributedModule):
        def __init__(self) -> None:
            super().__init__()
            self.first = Leaf(SPECS[:3])
            self.block = FakeBlock()
            self.second = Leaf(SPECS[3:])
            self.again = self.first  # a shared module: initialised once
            self.plain = torch.nn.Linear(2, 2)

    return Root


def _run() -> dict[str, object]:
    import bmt_comm
    from bmt_zero import gather_full, grouped_parameters, init_parameters

    model = _build()()
    init_parameters(model)
    assert model.block.calls == 1
    out = {}
    for leaf in (model.first, model.second):
        for name, p in leaf._parameters.items():
            full = gather_full(p)
            assert full is not None
            out[name] = full.numpy()  # tensors can't cross the harness's queue once the rank exits

    groups = dict(grouped_parameters(model))
    assert list(groups) == [None, "g", "blockgroup"], list(groups)
    assert [id(p) for p in groups["g"]] == [id(model.first._parameters["c"]), id(model.second._parameters["e"])]
    assert groups["blockgroup"] == [model.block.flat]
    ids = [id(p) for ps in groups.values() for p in ps]
    assert len(ids) == len(set(ids)) and id(model.block.inner) not in ids
    assert len(ids) == len(list(model.parameters())) - 1  # everything except the in-block view
    return out if bmt_comm.rank() == 0 else {}


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_init_parameters_same_at_every_world_size(spawn, world_size):
    got = spawn(_run)[0]
    want = _reference()
    assert list(got) == [name for name, _, _ in SPECS]
    for name in want:
        assert torch.equal(torch.from_numpy(got[name]), want[name]), name
