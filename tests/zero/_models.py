"""Small models shared by the bmt-zero tests: a distributed MLP and its plain-torch twin."""

from __future__ import annotations

import torch
import torch.nn.functional as F

D_IN, D_HIDDEN, D_OUT = 5, 7, 3  # odd sizes: shards are uneven, some empty at world size 4


def full_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w1": torch.randn(D_HIDDEN, D_IN, generator=g) * 0.5,
        "b1": torch.randn(D_HIDDEN, generator=g),
        "w2": torch.randn(D_OUT, D_HIDDEN, generator=g) * 0.5,
        "b2": torch.randn(D_OUT, generator=g),
        "scale": torch.tensor(1.5),
        "shift": torch.arange(D_OUT, dtype=torch.float32),
    }


class PlainMLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w1 = torch.nn.Parameter(torch.zeros(D_HIDDEN, D_IN))
        self.b1 = torch.nn.Parameter(torch.zeros(D_HIDDEN))
        self.w2 = torch.nn.Parameter(torch.zeros(D_OUT, D_HIDDEN))
        self.b2 = torch.nn.Parameter(torch.zeros(D_OUT))
        self.scale = torch.nn.Parameter(torch.tensor(1.0))
        self.register_buffer("shift", torch.zeros(D_OUT))
        self.register_buffer("scratch", torch.zeros(2), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(F.linear(x, self.w1, self.b1))
        return F.linear(h, self.w2, self.b2) * self.scale + self.shift


def make_dist_mlp(values: dict[str, torch.Tensor] | None = None) -> torch.nn.Module:
    """A DistributedModule twin of PlainMLP: ``values`` as full tensors, or built from shapes."""
    from bmt_zero import DistributedModule, DistributedParameter

    class DistMLP(DistributedModule):
        def __init__(self) -> None:
            super().__init__()
            for name, shape in (("w1", (D_HIDDEN, D_IN)), ("b1", (D_HIDDEN,)), ("w2", (D_OUT, D_HIDDEN)),
                                ("b2", (D_OUT,))):
                setattr(self, name, DistributedParameter(values[name] if values else shape))
            self.scale = torch.nn.Parameter(values["scale"].clone() if values else torch.tensor(1.0))
            self.register_buffer("shift", values["shift"].clone() if values else torch.zeros(D_OUT))
            self.register_buffer("scratch", torch.zeros(2), persistent=False)

        forward = PlainMLP.forward

    return DistMLP()


def batch(rank: int, n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + rank)
    return torch.randn(n, D_IN, generator=g), torch.randn(n, D_OUT, generator=g)


def store_model(scale: float = 1.0, wide: bool = False) -> torch.nn.Module:
    from bmt_zero import DistributedModule, DistributedParameter
    from bmt_zero.store import _save_to_rank0

    class Root(DistributedModule):
        def __init__(self) -> None:
            super().__init__()
            self.mlp = make_dist_mlp({k: v * scale for k, v in full_tensors().items()})
            g = torch.Generator().manual_seed(5)
            self.emb = DistributedParameter(torch.randn(11 if not wide else 12, 3, generator=g) * scale)
            self.lin = torch.nn.Linear(3, 2)  # a plain torch child
            with torch.no_grad():
                self.lin.weight.copy_(torch.randn(2, 3, generator=g) * scale)
                self.lin.bias.fill_(scale)
            self.norm = torch.nn.BatchNorm1d(2)  # plain buffers, an int64 one among them
            self.norm.running_mean.fill_(scale)
            self.tiny = DistributedParameter(torch.tensor([1.0, 2.0, 3.0]) * scale)  # fewer elements than ranks
            self.empty = DistributedParameter(torch.zeros(0, 4))
            self.bf16 = DistributedParameter((torch.randn(6, generator=g) * scale).to(torch.bfloat16))

    class ClientOverride(Root):
        """ModelCenter's pattern: state_dict overridden by _save_to_rank0."""

        def state_dict(self, destination=None, prefix="", keep_vars=False):  # noqa: ANN001, ANN201
            return _save_to_rank0(self, destination, prefix)

    return ClientOverride() if scale == 1.0 and not wide else Root()


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    state = torch.nn.Module.state_dict(model)  # torch's walk (not the override): full, every rank
    return {k: v.clone() for k, v in state.items()}  # plain tensors share the model's memory


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert list(a) == list(b), (what, list(a), list(b))
    for k in a:
        assert torch.equal(a[k].cpu(), b[k].cpu()), (what, k)


def block_model(scale: float = 1.0) -> torch.nn.Module:
    """Layers in bmt-ckpt Blocks (their params are views into flat storage) next to a plain
    DistributedParameter: the generic code must handle in-block parameters by duck typing."""
    from bmt_ckpt import Block, TransformerBlockList
    from bmt_zero import DistributedModule, DistributedParameter

    class Layer(DistributedModule):
        def __init__(self, i: int) -> None:
            super().__init__()
            g = torch.Generator().manual_seed(20 + i)
            self.w = DistributedParameter(torch.randn(6, 5, generator=g) * scale)
            self.b = DistributedParameter(torch.randn(5, generator=g) * scale)
            self.register_buffer("count", torch.full((2,), float(i) * scale))

    class Root(DistributedModule):
        def __init__(self) -> None:
            super().__init__()
            self.layers = TransformerBlockList([Block(Layer(i)) for i in range(3)])
            self.head = DistributedParameter(torch.arange(7.0) * scale)

    return Root()
