"""DistributedParameter reads outside Blocks: one all-gather per parameter per outermost module
call (a tied embedding read twice costs one gather and one reduce-scatter), values never stale
across calls, gradients as plain torch's; ``reused_gathers`` widens the scope by hand."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import torch
import torch.nn.functional as F

V, D, N = 11, 6, 5  # vocab, width, tokens


def _full_weights() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return torch.randn(V, D, generator=g), torch.randn(D, D, generator=g)


def _reference_loss(embed: torch.Tensor, proj: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    h = torch.tanh(F.embedding(ids, embed) @ proj)
    return F.cross_entropy(h @ embed.t(), ids)


def _model() -> Any:
    import bmt_zero

    class Embedding(bmt_zero.DistributedModule):
        def __init__(self, weight: torch.Tensor) -> None:
            super().__init__()
            self.weight = bmt_zero.DistributedParameter(weight.clone())

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return F.embedding(ids, self.weight)

        def projection(self, h: torch.Tensor) -> torch.Tensor:  # ModelCenter's tied output head
            return h @ self.weight.t()

    class TiedLM(bmt_zero.DistributedModule):
        def __init__(self) -> None:
            super().__init__()
            embed, proj = _full_weights()
            self.embed = Embedding(embed)
            self.proj = bmt_zero.DistributedParameter(proj.clone())

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            h = torch.tanh(self.embed(ids) @ self.proj)
            return F.cross_entropy(self.embed.projection(h), ids)

    return TiedLM()


def _count_collectives(counts: Counter[str]) -> None:
    import bmt_comm

    comm = bmt_comm.get_context().comms.zero
    for name in ("all_gather", "reduce_scatter"):
        method = getattr(comm, name)

        def counted(*args: Any, _method: Any = method, _name: str = name, **kwargs: Any) -> Any:
            counts[_name] += 1
            return _method(*args, **kwargs)

        setattr(comm, name, counted)


def _shard_of(full: torch.Tensor, param: Any) -> torch.Tensor:
    return full.reshape(-1)[param._start_partition : param._end_partition]


def _tied_model_reads() -> None:
    import bmt_comm
    import bmt_zero

    torch.backends.cuda.matmul.allow_tf32 = False  # on GPUs: compared with fp32 math on the CPU
    counts: Counter[str] = Counter()
    _count_collectives(counts)
    model = _model()
    cpu_ids = torch.tensor([1, 4, 9, 4, 0])
    ids = cpu_ids.to(bmt_comm.get_context().device)
    check = int(bmt_comm.get_context().world_size > 1)  # a model's first call: one all-gather of 8 bytes
    sharded = bool(check)  # over a group of one a read is a view of the parameter: no collective at all

    def collectives(**expected: int) -> Counter[str]:
        return Counter(expected) if sharded else Counter()

    # one forward: each parameter gathered once, though the embedding is read twice
    loss = model(ids)
    assert counts == collectives(all_gather=2 + check), counts
    counts.clear()
    loss.backward()
    assert counts == collectives(reduce_scatter=2), counts  # the two uses' gradients are summed first

    embed, proj = _full_weights()
    embed.requires_grad_(True)
    proj.requires_grad_(True)
    expected = _reference_loss(embed, proj, cpu_ids)
    expected.backward()
    torch.testing.assert_close(loss.cpu(), expected, rtol=1e-5, atol=1e-6)
    world = bmt_comm.get_context().world_size  # every rank ran the same batch: gradients sum over ranks
    w, p = model.embed._parameters["weight"], model._parameters["proj"]
    torch.testing.assert_close(w.grad.cpu(), world * _shard_of(embed.grad, w), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(p.grad.cpu(), world * _shard_of(proj.grad, p), rtol=1e-5, atol=1e-6)

    # outside a module call nothing is kept: each read is its own gather
    counts.clear()
    first, second = model.proj, model.proj
    assert first is not second and torch.equal(first, second) and counts["all_gather"] == (2 if sharded else 0)
    if not sharded:  # the whole tensor is the parameter's own memory, as in plain torch
        assert first.untyped_storage().data_ptr() == model._parameters["proj"].untyped_storage().data_ptr()

    # a changed shard (an optimizer step) is seen by the next call: the reuse ended with the last one
    shard = model.embed._parameters["weight"]
    with torch.no_grad():
        shard.add_(1.0)
    changed = _reference_loss(embed.detach() + 1.0, proj.detach(), cpu_ids)
    torch.testing.assert_close(model(ids).cpu(), changed, rtol=1e-5, atol=1e-6)

    # a read under no_grad is not reused by a read with grad in the same call: gradients flow
    class Mixed(bmt_zero.DistributedModule):
        def __init__(self) -> None:
            super().__init__()
            self.w = bmt_zero.DistributedParameter(torch.arange(6.0).view(2, 3))

        def forward(self) -> torch.Tensor:
            with torch.no_grad():
                scale = self.w.sum()
            return (self.w * scale).sum()

    mixed = Mixed()
    counts.clear()
    mixed().backward()
    assert counts == collectives(all_gather=2 + check, reduce_scatter=1), counts
    w = mixed._parameters["w"]
    torch.testing.assert_close(w.grad.cpu(), world * _shard_of(torch.full((2, 3), 15.0), w))

    # by hand: a decoding loop under no_grad gathers each parameter once in all
    counts.clear()
    with torch.no_grad(), bmt_zero.reused_gathers():
        losses = [model(ids) for _ in range(3)]
    assert counts == collectives(all_gather=2), counts
    assert losses[0].item() == losses[1].item() == losses[2].item()

    # reuse off (1.0.1's reads), also inside a scope that reuses: a gather and a reduce-scatter per read
    counts.clear()
    with bmt_zero.reused_gathers(), bmt_zero.reused_gathers(False):
        off = model(ids)
    off.backward()
    assert counts == collectives(all_gather=3, reduce_scatter=3), counts
    torch.testing.assert_close(off.cpu(), changed, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("world_size", [1, 2])
def test_one_gather_per_parameter_per_call(spawn, world_size):
    spawn(_tied_model_reads)
