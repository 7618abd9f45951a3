"""Plain parameters of a DistributedModule outside Blocks: their gradients are summed over the
zero group (as a DistributedParameter's), so the replicated copies stay equal on every rank and
equal to one process training on every rank's batch (1.0.1 let them drift apart)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ._models import D_OUT, PlainMLP, batch, full_tensors, make_dist_mlp
from ._util import assert_close

STEPS, MICRO, LR = 3, 2, 0.005


class _Plain(torch.nn.Module):
    """PlainMLP plus a plain torch child and a parameter frozen for the first step."""

    def __init__(self, mlp: torch.nn.Module) -> None:
        super().__init__()
        self.mlp = mlp
        g = torch.Generator().manual_seed(7)
        self.head = torch.nn.Linear(D_OUT, 2)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(2, D_OUT, generator=g))
            self.head.bias.zero_()
        self.late = torch.nn.Parameter(torch.tensor([0.5, -0.5]), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.mlp(x)) * (1 + self.late)


def _root_class() -> type[torch.nn.Module]:
    from bmt_zero import DistributedModule

    class Root(_Plain, DistributedModule):  # DistributedModule's __call__, _Plain's layers
        pass

    return Root


def _train(model: torch.nn.Module, batches_of_step: list[list[tuple[torch.Tensor, torch.Tensor]]]) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for step, batches in enumerate(batches_of_step):
        if step == 1:
            model.late.requires_grad_(True)  # SGD skipped it while it had no gradient
        for x, y in batches:  # accumulated micro-batches
            F.mse_loss(model(x), torch.zeros(x.shape[0], 2) + y[:, :1]).backward()
        opt.step()
        opt.zero_grad()


def _micro(rank: int, step: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    return batch(100 * rank + 10 * step + k)


def _check() -> dict[str, torch.Tensor]:
    import bmt_comm

    ctx = bmt_comm.get_context()
    rank, n = ctx.rank, ctx.world_size
    model = _root_class()(make_dist_mlp(full_tensors()))
    _train(model, [[_micro(rank, s, k) for k in range(MICRO)] for s in range(STEPS)])

    # one process, every rank's micro-batches: the gradient is the sum over ranks of each loss
    ref = _Plain(PlainMLP())
    ref.mlp.load_state_dict(full_tensors())
    _train(ref, [[_micro(r, s, k) for r in range(n) for k in range(MICRO)] for s in range(STEPS)])

    sd = model.state_dict()
    for key, value in ref.state_dict().items():
        assert_close(sd[key], value, rtol=1e-5, atol=1e-6, what=key)
    mine = torch.cat([model.mlp._parameters["scale"].detach().reshape(1), model.head.weight.detach().reshape(-1),
                      model.late.detach()])
    everyone = bmt_comm.all_gather(mine, ctx.comms.world)
    for r in range(n):
        assert torch.equal(everyone[r], mine), f"rank {r}'s replicated parameters differ from rank {rank}'s"
    return {"late": model.late.detach().clone()}


@pytest.mark.parametrize("world_size", [2, 4])
def test_replicated_parameters_stay_equal_and_match_one_process(spawn, world_size):
    results = spawn(_check)
    assert len(results) == world_size
    assert not torch.equal(results[0]["late"], torch.tensor([0.5, -0.5]))  # it did train after thawing


def _one_rank_unchanged() -> bool:
    """At a zero group of 1 nothing is hooked: the gradient is the local one, untouched."""
    model = make_dist_mlp(full_tensors())
    x, y = batch(0)
    F.mse_loss(model(x), y).backward()
    ref = PlainMLP()
    ref.load_state_dict(full_tensors())
    F.mse_loss(ref(x), y).backward()
    assert_close(model._parameters["scale"].grad, ref.scale.grad, what="grad scale")
    return not hasattr(model._parameters["scale"], "_bmt_replicated_grad_sync")


def test_one_rank_hooks_nothing(spawn):
    assert spawn(_one_rank_unchanged) == [True]
