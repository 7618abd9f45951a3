"""bmtrain.inspect: hidden-state records (checkpointed or not), parameter statistics, the table."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F

REL = 1e-5  # fp32 statistics of a few hundred values: only summation order differs


def _close(a: float | None, b: float | None, what: str) -> None:
    assert (a is None) == (b is None), what
    if a is not None and b is not None:
        assert math.isclose(a, b, rel_tol=REL, abs_tol=1e-6), f"{what}: {a} != {b}"


def _stats(t: torch.Tensor) -> dict[str, float]:
    t = t.detach().float()
    return {"min": t.min().item(), "max": t.max().item(), "mean": t.mean().item(), "std": t.std().item()}


def _gathered(x: torch.Tensor) -> torch.Tensor:
    """Every rank's ``x`` concatenated on dim 0, on the CPU (test-side reference)."""
    import bmt_comm

    local = x.detach().float().contiguous().to(_device())
    return torch.cat(list(bmt_comm.all_gather(local).unbind(0))).cpu()


def _device() -> torch.device:
    """Where the ranks' parameters live: cuda:rank under NCCL, else the CPU."""
    import bmt_comm

    return bmt_comm.get_context().device


# --- get_summary: pooled over ranks -----------------------------------------------------
def _summary_is_that_of_all_ranks_together() -> None:
    import bmt_comm
    import bmtrain as bmt

    rank = bmt_comm.rank()
    g = torch.Generator().manual_seed(rank)
    # ranks differ in mean (10 apart) and spread: averaging per-rank variances would be far off
    a = ((torch.randn(3, 5, generator=g) * (1 + rank) + 10 * rank) * 100).half()
    leaf = torch.randn(4, 2, generator=g, requires_grad=True)
    with bmt.inspect.inspect_tensor() as insp:
        bmt.inspect.record_tensor(a, "a")
        h = leaf * 3
        bmt.inspect.record_tensor(h, "h", group="grp")
        h.square().sum().backward()
    summary = insp.get_summary()
    assert [s["name"] for s in summary] == ["0.a", "grp.0.h"]
    ref_a = _stats(_gathered(a))
    for key in ("min", "max", "mean", "std"):
        _close(summary[0][key], ref_a[key], f"a {key}")
    assert summary[0]["shape"] == (6, 5)
    assert summary[0]["grad_mean"] is None and summary[0]["grad_std"] is None
    ref_h, ref_g = _stats(_gathered(h)), _stats(_gathered(2 * h))
    _close(summary[1]["std"], ref_h["std"], "h std")
    _close(summary[1]["mean"], ref_h["mean"], "h mean")
    _close(summary[1]["grad_std"], ref_g["std"], "h grad std")
    _close(summary[1]["grad_mean"], ref_g["mean"], "h grad mean")
    assert summary[1]["shape"] == (8, 2)


@pytest.mark.world_size(2)
def test_summary_pools_every_rank(spawn: Any) -> None:
    spawn(_summary_is_that_of_all_ranks_together)


# --- records inside checkpointed code ---------------------------------------------------
def _records(model_fn: Any, x: torch.Tensor) -> tuple[list[dict[str, Any]], list[torch.Tensor], list[Any]]:
    import bmtrain as bmt

    with bmt.inspect.inspect_tensor() as insp:
        out = model_fn(x)
        out.square().sum().backward()
    summary = insp.get_summary()
    tensors = [insp.get_tensor("h", index=i) for i in range(3)]
    grads = [insp.get_grad("h", index=i) for i in range(3)]
    assert all(t is not None for t in tensors) and insp.get_tensor("h", index=3) is None
    return summary, tensors, grads


def _assert_same_records(got: Any, ref: Any, what: str) -> None:
    assert [s["name"] for s in got[0]] == [s["name"] for s in ref[0]], what
    for a, b in zip(got[0], ref[0], strict=True):
        assert a["shape"] == b["shape"], what
        for key in ("min", "max", "mean", "std", "grad_mean", "grad_std"):
            _close(a[key], b[key], f"{what}: {a['name']} {key}")
    for a, b in zip(got[1], ref[1], strict=True):
        torch.testing.assert_close(a, b, msg=what)
    for a, b in zip(got[2], ref[2], strict=True):
        assert a is not None and b is not None, what
        torch.testing.assert_close(a, b, msg=what)


class _TorchLayer(torch.nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import bmtrain as bmt

        h = torch.tanh(self.lin(x))
        bmt.inspect.record_tensor(h, "h")
        bmt.inspect.record_tensor(h * 2, "h", group="unused")  # reaches no loss: no gradient
        return x + h


def _torch_checkpoint_records_like_plain() -> None:
    import bmt_comm
    import torch.utils.checkpoint as cp

    torch.manual_seed(0)
    layers = torch.nn.ModuleList([_TorchLayer(8) for _ in range(3)])
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(bmt_comm.rank())).requires_grad_()

    def plain(h: torch.Tensor) -> torch.Tensor:
        for layer in layers:
            h = layer(h)
        return h

    def checkpointed(reentrant: bool) -> Any:
        def run(h: torch.Tensor) -> torch.Tensor:
            for layer in layers:
                h = cp.checkpoint(layer, h, use_reentrant=reentrant)
            return h

        return run

    ref = _records(plain, x)
    _assert_same_records(_records(checkpointed(True), x), ref, "reentrant checkpoint")
    _assert_same_records(_records(checkpointed(False), x), ref, "non-reentrant checkpoint")


@pytest.mark.world_size(2)
def test_record_tensor_under_torch_checkpoint(spawn: Any) -> None:
    spawn(_torch_checkpoint_records_like_plain)


def _bmt_layer_class() -> type:
    import bmtrain as bmt

    class Layer(bmt.DistributedModule):
        def __init__(self, d: int) -> None:
            super().__init__()
            self.weight = bmt.DistributedParameter(
                torch.empty(d, d), init_method=bmt.ParameterInitializer(torch.nn.init.normal_, std=0.3)
            )
            self.bias = bmt.DistributedParameter(
                torch.empty(d), init_method=bmt.ParameterInitializer(torch.nn.init.normal_, std=0.1)
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.tanh(F.linear(x, self.weight, self.bias))
            bmt.inspect.record_tensor(h, "h")
            bmt.inspect.record_tensor(x, "in", group="blk")
            return x + h

    return Layer


def _blocks(use_checkpoint: bool) -> torch.nn.Module:
    import bmtrain as bmt

    layer = _bmt_layer_class()
    return bmt.TransformerBlockList([bmt.Block(layer(8), use_checkpoint=use_checkpoint) for _ in range(3)])


def _checkpointed_blocks_record_like_plain_blocks() -> None:
    import bmt_comm
    import bmtrain as bmt

    checkpointed, plain = _blocks(True), _blocks(False)
    bmt.init_parameters(checkpointed)
    plain.load_state_dict(checkpointed.state_dict())
    g = torch.Generator().manual_seed(bmt_comm.rank())
    for input_requires_grad in (True, False):  # Blocks recompute in both cases
        x = torch.randn(4, 8, generator=g).to(_device()).requires_grad_(input_requires_grad)
        ref = _records(plain, x)
        got = _records(checkpointed, x)
        _assert_same_records(got, ref, f"Block(use_checkpoint=True), input requires grad {input_requires_grad}")


@pytest.mark.world_size(2)
def test_record_tensor_inside_checkpointed_blocks(spawn: Any) -> None:
    spawn(_checkpointed_blocks_record_like_plain_blocks)


# --- inspect_model over sharded parameters ------------------------------------------------
def _inspect_model_equals_gathered_statistics() -> None:
    import bmt_comm
    import bmtrain as bmt

    layer = _bmt_layer_class()

    class Top(bmt.DistributedModule):
        def __init__(self) -> None:
            super().__init__()
            # 15 elements over 2 ranks: uneven shards, one padded
            self.w0 = bmt.DistributedParameter(
                torch.empty(3, 5), init_method=bmt.ParameterInitializer(torch.nn.init.normal_, std=1.0)
            )
            self.blocks = bmt.TransformerBlockList([bmt.Block(layer(5)), bmt.Block(layer(5))])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.blocks(x @ self.w0)  # (4, 3) @ (3, 5) -> (4, 5)

    model = Top()
    bmt.init_parameters(model)
    full = {k: v.float().cpu() for k, v in model.state_dict().items()}
    assert set(full) == {"w0", "blocks.0.weight", "blocks.0.bias", "blocks.1.weight", "blocks.1.bias"}

    before = bmt.inspect.inspect_model(model, "*")
    assert [s["name"] for s in before] == list(model.state_dict())
    for s in before:
        assert s["grad_std"] == 0.0 and s["grad_mean"] == 0.0

    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(10 + bmt_comm.rank()))
    model(x.to(_device())).square().sum().backward()

    # reference: the same model in plain torch over every rank's input (ZeRO sums gradients)
    ref = {k: v.clone().requires_grad_() for k, v in full.items()}
    h = _gathered(x).view(-1, 4, 3) @ ref["w0"]
    for i in range(2):
        w, b = ref[f"blocks.{i}.weight"], ref[f"blocks.{i}.bias"]
        h = h + torch.tanh(F.linear(h, w, b))
    h.square().sum().backward()

    stats = bmt.inspect.inspect_model(model, "*")
    for s in stats:
        name = s["name"]
        value, grad = _stats(full[name]), _stats(ref[name].grad)
        assert s["shape"] == tuple(full[name].shape), name
        for key in ("min", "max", "mean", "std"):
            _close(s[key], value[key], f"{name} {key}")
        _close(s["grad_std"], grad["std"], f"{name} grad_std")
        _close(s["grad_mean"], grad["mean"], f"{name} grad_mean")

    assert [s["name"] for s in bmt.inspect.inspect_model(model, "*.bias")] == ["blocks.0.bias", "blocks.1.bias"]
    assert [s["name"] for s in bmt.inspect.inspect_model(model, "m.w*", prefix="m.")] == ["m.w0"]


@pytest.mark.world_size(2)
def test_inspect_model_statistics_are_those_of_the_gathered_tensors(spawn: Any) -> None:
    spawn(_inspect_model_equals_gathered_statistics)


def _inspect_model_without_blocks() -> None:
    import bmt_comm
    import bmtrain as bmt

    class Flat(bmt.DistributedModule):
        def __init__(self) -> None:
            super().__init__()
            init = bmt.ParameterInitializer(torch.nn.init.normal_, std=1.0)
            self.w0 = bmt.DistributedParameter(torch.empty(3, 5), init_method=init)  # 15 over 2: uneven
            self.w1 = bmt.DistributedParameter(torch.empty(1), init_method=init)  # rank 1 holds nothing
            self.head = torch.nn.Linear(5, 2)  # plain: replicated, its local tensor is whole

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.tanh(x @ self.w0) * self.w1)

    torch.manual_seed(3)
    model = Flat()
    model.head.to(_device())
    bmt.init_parameters(model)
    full = {k: v.float().cpu() for k, v in model.state_dict().items()}
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(10 + bmt_comm.rank()))
    model(x.to(_device())).square().sum().backward()

    ref = {k: v.float().cpu().clone().requires_grad_() for k, v in full.items()}
    xs = _gathered(x).view(-1, 4, 3)
    for r in range(xs.shape[0]):  # gradients sum over ranks, the plain (replicated) parameters' too
        y = F.linear(torch.tanh(xs[r] @ ref["w0"]) * ref["w1"], ref["head.weight"], ref["head.bias"])
        y.square().sum().backward()

    stats = bmt.inspect.inspect_model(model, "*")
    assert [s["name"] for s in stats] == ["w0", "w1", "head.weight", "head.bias"]
    for s in stats:
        name = s["name"]
        grad = ref[name].grad
        value, g = _stats(full[name]), _stats(grad)
        assert s["shape"] == tuple(full[name].shape), name
        for key in ("min", "max", "mean"):
            _close(s[key], value[key], f"{name} {key}")
        _close(s["grad_mean"], g["mean"], f"{name} grad_mean")
        if full[name].numel() > 1:
            _close(s["std"], value["std"], f"{name} std")
            _close(s["grad_std"], g["std"], f"{name} grad_std")
        else:
            assert math.isnan(s["std"]) and math.isnan(s["grad_std"])  # as torch.std of one element


@pytest.mark.world_size(2)
def test_inspect_model_over_sharded_and_plain_parameters(spawn: Any) -> None:
    spawn(_inspect_model_without_blocks)


def _inspect_model_under_tensor_parallelism() -> None:
    import bmtrain as bmt

    class TP(bmt.DistributedModule):
        def __init__(self) -> None:
            super().__init__()
            self.col = bmt.nn.ColumnParallelLinear(6, 10, bias=True)  # weight split on dim 0 over tp
            self.row = bmt.nn.RowParallelLinear(10, 3, bias=True)  # weight split on dim 1, bias replicated

    model = TP()
    bmt.init_parameters(model)
    full = model.state_dict()  # whole, un-split tensors
    stats = bmt.inspect.inspect_model(model, "*")
    assert [s["name"] for s in stats] == list(full)
    for s in stats:
        name = s["name"]
        ref = _stats(full[name])
        assert s["shape"] == tuple(full[name].shape), (name, s["shape"])
        for key in ("min", "max", "mean", "std"):
            _close(s[key], ref[key], f"{name} {key}")


@pytest.mark.world_size(4)
def test_inspect_model_pools_tensor_parallel_slices(spawn: Any) -> None:
    spawn(_inspect_model_under_tensor_parallelism, tp_size=2)


# --- no process group needed ----------------------------------------------------------------
def test_record_tensor_rules() -> None:
    import bmtrain as bmt

    t = torch.ones(2, 2)
    bmt.inspect.record_tensor(t, "outside")  # a no-op outside the context
    with pytest.raises(RuntimeError, match="Parameter"):
        with bmt.inspect.inspect_tensor():
            bmt.inspect.record_tensor(torch.nn.Parameter(t), "p")
    with bmt.inspect.inspect_tensor() as insp:
        with pytest.raises(RuntimeError, match="nested"):
            with bmt.inspect.inspect_tensor():
                pass
        bmt.inspect.record_tensor(t, "x")
        bmt.inspect.record_tensor(t + 1, "x")
        bmt.inspect.record_tensor(t + 2, "x", group="g")
    assert insp.get_tensor("outside") is None
    assert torch.equal(insp.get_tensor("x"), t)  # index defaults to the first occurrence
    assert torch.equal(insp.get_tensor("x", index=1), t + 1)
    assert torch.equal(insp.get_tensor("x", index=-1), t + 1)
    assert torch.equal(insp.get_tensor("x", group="g"), t + 2)
    assert insp.get_tensor("x", group="g", index=1) is None
    assert insp.get_tensor("x", group="other") is None


def test_format_summary_layout() -> None:
    import bmtrain as bmt

    summary = [
        {"name": "0.h", "shape": (8, 8), "max": 1.0, "min": -1.0, "std": 0.5, "mean": 0.123456,
         "grad_std": None, "grad_mean": None},
        {"name": "grp.12.hidden", "shape": (2, 3), "max": 123456.789, "min": -0.00001, "std": 2.0, "mean": 0.0,
         "grad_std": 0.25, "grad_mean": -0.5},
    ]
    width = len("grp.12.hidden") + 4
    expected = "\n".join([
        " " + "name".ljust(width) + " " + "shape".ljust(20)
        + "".join(" " + c.ljust(10) for c in ("max", "min", "std", "mean", "grad_std", "grad_mean")),
        " " + "0.h".ljust(width) + " " + "(8, 8)".ljust(20)
        + "".join(" " + c.ljust(10) for c in ("1.0000", "-1.0000", "0.5000", "0.1235", "None", "None")),
        " " + "grp.12.hidden".ljust(width) + " " + "(2, 3)".ljust(20)
        + "".join(" " + c.ljust(10) for c in ("123456.789", "-0.0000", "2.0000", "0.0000", "0.2500", "-0.5000")),
    ])
    assert bmt.inspect.format_summary(summary) == expected
