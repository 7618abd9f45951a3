"""DistributedModule: forward/backward equal plain torch, state dicts, wrapper, tensor parallel."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from ._models import D_IN, D_OUT, PlainMLP, batch, full_tensors, make_dist_mlp
from ._util import assert_close


def _slice(full: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    return full.reshape(-1)[p._start_partition : p._end_partition]


def _check_mlp() -> None:
    import bmt_comm
    from bmt_zero import DistributedModule, DistributedParameter

    ctx = bmt_comm.get_context()
    rank, n = ctx.rank, ctx.world_size
    values = full_tensors()
    model = make_dist_mlp(values)
    ref = PlainMLP()
    ref.load_state_dict(values)

    # forward and backward: each rank its own batch; the reference sums every rank's loss
    x, y = batch(rank)
    loss = F.mse_loss(model(x), y)
    loss.backward()
    ref_losses = [F.mse_loss(ref(*batch(r)[:1]), batch(r)[1]) for r in range(n)]
    assert_close(loss.detach(), ref_losses[rank].detach(), what="loss")
    sum(ref_losses).backward()
    for name in ("w1", "b1", "w2", "b2"):
        p = model._parameters[name]
        assert isinstance(p, DistributedParameter) and p.grad is not None
        assert_close(p.grad, _slice(getattr(ref, name).grad, p), what=f"grad {name}")
    # a plain (replicated) parameter's gradient is summed over the ranks, as a sharded one's
    assert_close(model._parameters["scale"].grad, ref.scale.grad, what="grad scale")
    assert isinstance(model.w1, torch.Tensor) and not isinstance(model.w1, DistributedParameter)
    assert model.w1.shape == (7, 5) and model.scale is model._parameters["scale"]

    # state_dict: full tensors (CPU), keyed like the plain model, non-persistent buffer left out
    sd = model.state_dict()
    ref_sd = ref.state_dict()
    assert list(sd) == list(ref_sd) == ["w1", "b1", "w2", "b2", "scale", "shift"]
    for k in sd:
        assert sd[k].device.type == "cpu"
        assert_close(sd[k], ref_sd[k], what=f"state_dict[{k}]")
    assert sd._metadata[""]["version"] == 1

    # round trip into a model built from shapes (shard only); plain param and buffer load too
    fresh = make_dist_mlp()
    result = fresh.load_state_dict(sd)
    assert result.missing_keys == [] and result.unexpected_keys == []
    for k, v in fresh.state_dict().items():
        assert_close(v, sd[k], what=f"round trip {k}")

    # wrong shape: torch's message, naming the key and both shapes
    bad = dict(sd, w2=torch.zeros(4, 4))
    with pytest.raises(RuntimeError, match=r"size mismatch for w2: copying a param with shape "
                                           r"torch.Size\(\[4, 4\]\) from checkpoint, the shape in "
                                           r"current model is torch.Size\(\[3, 7\]\)"):
        fresh.load_state_dict(bad)
    with pytest.raises(RuntimeError, match=r"size mismatch for shift: .*torch.Size\(\[5\]\).*torch.Size\(\[3\]\)"):
        fresh.load_state_dict(dict(sd, shift=torch.zeros(5)))

    # missing / unexpected keys reported exactly as the plain model reports them
    odd = {k: v for k, v in sd.items() if k not in ("b2", "shift")}
    odd["extra"] = torch.zeros(1)
    odd["sub.thing"] = torch.zeros(1)
    got = fresh.load_state_dict(odd, strict=False)
    want = PlainMLP().load_state_dict(odd, strict=False)
    assert (got.missing_keys, got.unexpected_keys) == (want.missing_keys, want.unexpected_keys)
    assert got.missing_keys == ["b2", "shift"] and got.unexpected_keys == ["extra", "sub.thing"]
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "b2", "shift"'):
        fresh.load_state_dict(odd)

    # settings: save_param_to_cpu=False keeps gathered tensors on the device (CPU here too),
    # keep_vars returns the plain parameter itself
    ctx.settings.save_param_to_cpu = False
    try:
        assert model.state_dict(keep_vars=True)["scale"] is model._parameters["scale"]
    finally:
        ctx.settings.save_param_to_cpu = True
    assert isinstance(model, DistributedModule)


class _Tied(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = torch.nn.Linear(D_IN, 6)
        self.norm = torch.nn.BatchNorm1d(6)
        self.body = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.GELU(), torch.nn.LayerNorm(6))
        self.dec = torch.nn.Linear(6, D_IN, bias=False)
        self.dec.weight = torch.nn.Parameter(self.enc.weight.detach().t().contiguous())
        self.head = torch.nn.Linear(D_IN, D_OUT)
        self.head2 = torch.nn.Linear(D_IN, D_OUT)
        self.head2.weight = self.head.weight  # tied

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(self.norm(self.enc(x)))
        return self.head(self.dec(h)) + self.head2(x)


def _check_wrapper() -> None:
    import bmt_comm
    from bmt_zero import DistributedModule, DistributedParameter, make_distributed

    rank, n = bmt_comm.rank(), bmt_comm.world_size()
    torch.manual_seed(3)
    plain = _Tied()
    model = make_distributed(copy.deepcopy(plain))
    assert type(model).__name__ == "Distributed_Tied" and isinstance(model, DistributedModule)
    assert type(model.body[0]).__name__ == "DistributedLinear" and isinstance(model.body[0], torch.nn.Linear)
    assert all(isinstance(p, DistributedParameter) for p in model.parameters())
    assert model.head._parameters["weight"] is model.head2._parameters["weight"]
    assert len(list(model.parameters())) == len(list(plain.parameters()))

    x, _ = batch(rank, 8)
    out = model(x)  # BatchNorm in training mode: running stats updated from this rank's batch
    plain_out = plain(x)
    assert_close(out, plain_out, what="wrapped forward")
    sd, plain_sd = model.state_dict(), plain.state_dict()
    assert list(sd) == list(plain_sd)
    for k in sd:
        assert_close(sd[k], plain_sd[k], what=f"wrapped state_dict[{k}]")

    # gradients: shards hold the sum over ranks of the plain gradient
    out.sum().backward()
    ref = copy.deepcopy(plain)
    sum(ref(batch(r, 8)[0]).sum() for r in range(n)).backward()
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
        assert_close(p.grad, _slice(q.grad, p), rtol=1e-4, atol=1e-5, what=f"wrapped grad {name}")
    assert make_distributed(model) is model


def _check_module() -> None:
    _check_mlp()
    _check_wrapper()


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_module(spawn, world_size):
    spawn(_check_module)


def _check_tensor_parallel(tmp: str) -> None:
    import bmt_comm
    import bmt_zero
    from bmt_zero import DistributedModule, DistributedParameter, gather_to

    ctx = bmt_comm.get_context()
    tp, tp_rank = ctx.comms.tp.size, ctx.comms.tp.rank
    g = torch.Generator().manual_seed(7)
    col = torch.randn(4 * tp, 3, generator=g)  # split on dim 0
    row = torch.randn(3, 2 * tp, generator=g)  # split on dim 1
    rep = torch.randn(5, generator=g)  # tp_mode, replicated

    class TP(DistributedModule):
        def __init__(self, scale: float = 1.0) -> None:
            super().__init__()
            self.col = DistributedParameter(col[4 * tp_rank : 4 * (tp_rank + 1)] * scale, tp_mode=True,
                                            tp_split_dim=0)
            self.row = DistributedParameter(row[:, 2 * tp_rank : 2 * (tp_rank + 1)] * scale, tp_mode=True,
                                            tp_split_dim=1)
            self.rep = DistributedParameter(rep * scale, tp_mode=True)

    m = TP()
    assert m._parameters["col"]._tp_original_shape == col.shape and m._parameters["col"].group == "tp"
    assert torch.equal(m._parameters["col"].gather_all(), col)
    assert torch.equal(m._parameters["row"].gather_all(), row)
    assert torch.equal(m.row, row[:, 2 * tp_rank : 2 * (tp_rank + 1)])  # attribute read: this tp rank's slice
    sd = m.state_dict()
    for k, v in (("col", col), ("row", row), ("rep", rep)):
        assert torch.equal(sd[k], v), k
    with gather_to(0):
        kept = m.state_dict()
    assert (set(kept) == {"col", "row", "rep"}) if ctx.rank == 0 else not kept

    other = TP(scale=0.0)
    other.load_state_dict(sd)  # full tensors in, each tp rank keeps its split
    for k in ("col", "row", "rep"):
        assert torch.equal(other._parameters[k].gather_all(), sd[k]), k
    assert torch.equal(other.col, col[4 * tp_rank : 4 * (tp_rank + 1)])

    # through the checkpoint functions: the file holds un-split tensors; loading splits again
    path = f"{tmp}/tp.pt"
    bmt_zero.save(m, path)
    if ctx.rank == 0:
        on_disk = torch.load(path)
        assert all(torch.equal(on_disk[k], v) for k, v in (("col", col), ("row", row), ("rep", rep)))
    third = TP(scale=0.0)
    bmt_zero.load(third, path)
    assert torch.equal(third._parameters["row"].gather_all(), row)
    fourth = TP(scale=0.0)
    bmt_zero.save_sharded(m, f"{tmp}/tp_sharded")
    bmt_zero.load_sharded(fourth, f"{tmp}/tp_sharded")
    for k in ("col", "row", "rep"):
        assert torch.equal(fourth._parameters[k].gather_all(), sd[k]), k


@pytest.mark.parametrize("world_size", [2, 4])
def test_tensor_parallel(spawn, world_size, tmp_path):
    spawn(_check_tensor_parallel, str(tmp_path), tp_size=2)


def _bare_container() -> None:
    import bmt_zero

    torch.manual_seed(0)
    model = torch.nn.Module()  # a bare container, as scripts build: children set as attributes
    model.lin = torch.nn.Linear(3, 2)
    want = model.lin.weight.detach().clone()
    bmt_zero.make_distributed(model)
    assert isinstance(model, bmt_zero.DistributedModule)
    assert torch.equal(model.state_dict()["lin.weight"], want)


def test_a_bare_module_container_converts(spawn):
    spawn(_bare_container)
