"""Tensor-parallel layers against torch.nn.Linear / F.embedding in one process.

Convention (see bmt_zero.nn._tp_ops): activations are dim-0 sharded over the tp group. Each DP
replica ``d`` (ranks ``d*tp .. d*tp+tp-1``) gets its own full batch ``X_d`` and output gradient
``G_d``; the reference computes ``sum_d (f(X_d) * G_d).sum()`` with plain torch and full weights.
Each rank feeds its shard of ``X_d``, back-propagates its shard of ``G_d``, and must see its shard
of the reference output and input gradient, and (gathered) the whole reference weight gradients.
fp32; tolerance atol 1e-5, rtol 1e-4 on CPU (only summation order differs), 10x that on GPU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import bmt_comm
import pytest
import torch
import torch.nn.functional as F
from bmt_zero import DistributedParameter
from bmt_zero.nn import (
    ColumnParallelLinear,
    Linear,
    OpParallelLinear,
    ReduceType,
    RowParallelLinear,
    VPEmbedding,
)

ATOL, RTOL = 1e-5, 1e-4
IN, OUT, SEQ, ROWS = 8, 12, 3, 3  # ROWS: rows per tp rank (odd, so 2 chunks are uneven)
VOCAB, DIM = 16, 6

Params = dict[str, torch.Tensor]


def _close(what: str, got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = (got - want).abs().max().item() if got.numel() else 0.0
    # GPU kernels sum in other orders (fp32, TF32 off): 10x looser there
    atol, rtol = (ATOL, RTOL) if got.device.type == "cpu" else (10 * ATOL, 10 * RTOL)
    assert torch.allclose(got, want, atol=atol, rtol=rtol), f"{what}: max abs err {err}"


def full_grad(p: DistributedParameter) -> torch.Tensor:
    """The whole (tp-concatenated) gradient of a parameter from every rank's shard of it."""
    assert p.grad is not None, f"no gradient for {p!r}"
    part, comm = p._partition, p._zero_comm
    g = torch.zeros(part.shard_numel, dtype=p.dtype, device=p.device)
    g[: part.local_numel] = p.grad.reshape(-1)
    flat = torch.empty(part.padded_numel, dtype=p.dtype, device=p.device)
    comm.all_gather(g, flat)
    full = flat[: part.numel].view(p._original_shape)
    if p._tp_mode and p._tp_split_dim >= 0:
        full = torch.cat(list(bmt_comm.all_gather(full, bmt_comm.get_context().comms.tp).unbind(0)), p._tp_split_dim)
    return full


def _tp() -> int:
    return bmt_comm.get_context().comms.tp.size


def _rows(t: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    return t.chunk(size, 0)[rank]


def _cols(t: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    return t.chunk(size, -1)[rank]


@dataclass
class Case:
    label: str
    make: Callable[[], torch.nn.Module]
    ref: Callable[[Params, torch.Tensor], torch.Tensor]
    full: Params
    input: str = "rows"  # "rows" (dim-0 shard), "replicated", "features" (last-dim shard)
    out_rows: bool = False  # the output holds this rank's dim-0 block
    out_cols: bool = False  # the output holds this rank's last-dim slice
    call: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor] = field(default=lambda m, x: m(x))
    ids: bool = False  # integer inputs (embedding lookup)


def run_case(case: Case, seed: int) -> None:
    ctx = bmt_comm.get_context()
    tp, r = ctx.comms.tp.size, ctx.comms.tp.rank
    dp, d = ctx.world_size // tp, ctx.rank // tp
    gen = torch.Generator().manual_seed(seed)
    n_all = tp * ROWS
    if case.ids:
        xs = [torch.randint(0, VOCAB, (n_all, SEQ), generator=gen) for _ in range(dp)]
    else:
        xs = [torch.randn(n_all, SEQ, case.full["weight"].shape[-1], generator=gen) for _ in range(dp)]

    # reference: one process, full weights, every replica's batch
    dev = ctx.device
    xs = [x.to(dev) for x in xs]
    full = {k: v.to(dev) for k, v in case.full.items()}
    params = {k: v.clone().requires_grad_() for k, v in full.items()}
    ref_xs = [x if case.ids else x.clone().requires_grad_() for x in xs]
    ref_ys = [case.ref(params, x) for x in ref_xs]
    gs = [torch.randn(y.shape, generator=gen).to(dev) for y in ref_ys]
    sum((y * g).sum() for y, g in zip(ref_ys, gs, strict=True)).backward()

    def shard_in(t: torch.Tensor) -> torch.Tensor:
        if case.input == "rows":
            return _rows(t, r, tp)
        return _cols(t, r, tp) if case.input == "features" else t

    def shard_out(t: torch.Tensor) -> torch.Tensor:
        t = _rows(t, r, tp) if case.out_rows else t
        return _cols(t, r, tp) if case.out_cols else t

    layer = case.make()
    layer.load_state_dict(full)
    state = layer.state_dict()
    for k, v in case.full.items():
        _close(f"{case.label}: state_dict[{k}]", state[k].cpu(), v)
    x = shard_in(xs[d]).clone()
    if not case.ids:
        x.requires_grad_()
    y = case.call(layer, x)
    _close(f"{case.label}: output", y, shard_out(ref_ys[d].detach()))
    (y * shard_out(gs[d])).sum().backward()
    if not case.ids:
        assert x.grad is not None and ref_xs[d].grad is not None
        _close(f"{case.label}: input grad", x.grad, shard_in(ref_xs[d].grad))
    for name, p in layer.named_parameters():
        assert isinstance(p, DistributedParameter)
        _close(f"{case.label}: {name} grad", full_grad(p), params[name].grad)  # type: ignore[arg-type]


def _linear_ref(p: Params, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, p["weight"], p.get("bias"))


def _weights(seed: int, out: int, inp: int, bias: bool = True) -> Params:
    gen = torch.Generator().manual_seed(seed)
    w = {"weight": torch.randn(out, inp, generator=gen)}
    if bias:
        w["bias"] = torch.randn(out, generator=gen)
    return w


def _op_split(reduce: ReduceType | int) -> Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]:
    """OpParallelLinear on a replicated input: split its last dim, no gather."""

    def call(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = OpParallelLinear.apply(x, m.weight, None, False, False, True, reduce, 2)
        return out + m.bias

    return call


def all_cases() -> list[Case]:
    w, wnb = _weights(1, OUT, IN), _weights(2, OUT, IN, bias=False)
    table = {"weight": torch.randn(VOCAB, DIM, generator=torch.Generator().manual_seed(3))}
    col, row = ColumnParallelLinear, RowParallelLinear
    return [
        Case("Linear", lambda: Linear(IN, OUT), _linear_ref, w, out_rows=True),
        Case("Linear(bias=False)", lambda: Linear(IN, OUT, bias=False), _linear_ref, wnb, out_rows=True),
        Case("Column(gather_input)", lambda: col(IN, OUT), _linear_ref, w, out_cols=True),
        Case("Column(gather_input, chunks=1)", lambda: col(IN, OUT, async_gather_chunks=1), _linear_ref, w,
             out_cols=True),
        Case("Column(gather_input, gather_output, chunks=3)",
             lambda: col(IN, OUT, gather_output=True, async_gather_chunks=3), _linear_ref, w),
        Case("Column(replicated input)", lambda: col(IN, OUT, gather_input=False), _linear_ref, w,
             input="replicated", out_cols=True),
        Case("Column(replicated input, gather_output, no bias)",
             lambda: col(IN, OUT, bias=False, gather_input=False, gather_output=True), _linear_ref, wnb,
             input="replicated"),
        Case("Row(reduce-scatter)", lambda: row(IN, OUT), _linear_ref, w, input="features", out_rows=True),
        Case("Row(all-reduce)", lambda: row(IN, OUT, all_reduce_output=True), _linear_ref, w, input="features"),
        Case("Row(split_input, reduce-scatter)", lambda: row(IN, OUT, split_input=True), _linear_ref, w,
             out_rows=True),
        Case("Row(split_input, all-reduce, chunks=1)",
             lambda: row(IN, OUT, split_input=True, all_reduce_output=True, async_chunks=1), _linear_ref, w),
        Case("Op(split_input, ALL_REDUCE)", lambda: row(IN, OUT, all_reduce_output=True), _linear_ref, w,
             input="replicated", call=_op_split(ReduceType.ALL_REDUCE)),
        Case("Op(split_input, reduce type 2)", lambda: row(IN, OUT), _linear_ref, w, input="replicated",
             out_rows=True, call=_op_split(2)),
        Case("VPEmbedding lookup", lambda: VPEmbedding(VOCAB, DIM, dtype=torch.float32),
             lambda p, x: F.embedding(x, p["weight"]), table, out_rows=True, ids=True),
        Case("VPEmbedding projection", lambda: VPEmbedding(VOCAB, DIM, dtype=torch.float32),
             lambda p, x: F.linear(x, p["weight"]), table, out_cols=True,
             call=lambda m, x: m(x, projection=True).view(-1, *x.shape[1:-1], VOCAB // _tp())),
    ]


def _check_all_layers() -> int:
    for i, case in enumerate(all_cases()):
        run_case(case, seed=100 + i)
    return bmt_comm.get_context().comms.tp.size


def _expect(exc: type[Exception], match: str, fn: Callable[[], Any]) -> None:
    with pytest.raises(exc, match=match):
        fn()


def _check_errors_and_repr() -> None:
    _expect(ValueError, r"out_features \(5\) must be divisible by tp_size \(2\)", lambda: ColumnParallelLinear(8, 5))
    _expect(ValueError, r"in_features \(5\) must be divisible by tp_size \(2\)", lambda: RowParallelLinear(5, 8))
    _expect(ValueError, r"vocab_size \(15\) must be divisible by tp_size \(2\)", lambda: VPEmbedding(15, 4))
    _expect(ValueError, r"in_features must be a positive int, got 0", lambda: Linear(0, 4))
    _expect(ValueError, r"async_chunks must be a positive int, got 0", lambda: RowParallelLinear(4, 4, async_chunks=0))
    row = RowParallelLinear(4, 4, dtype=torch.float32)
    _expect(ValueError, r"dim 0 \(3\) must be divisible by tp_size \(2\)", lambda: row(torch.randn(3, 2)))
    w = torch.randn(4, 2)
    _expect(ValueError, r"gather_output=True cannot be combined",
            lambda: OpParallelLinear.apply(torch.randn(2, 2), w, None, False, True, False, ReduceType.ALL_REDUCE))
    _expect(ValueError, r"reduce_output_type must be None, ReduceType or one of \[1, 2\], got 3",
            lambda: OpParallelLinear.apply(torch.randn(2, 2), w, None, False, False, False, 3))
    emb = VPEmbedding(8, 4, dtype=torch.float32)
    _expect(ValueError, r"embedding ids must be in \[0, 8\), got ids in \[0, 8\]",
            lambda: emb(torch.tensor([0, 8])))
    _expect(TypeError, r"embedding ids must be int64 or int32", lambda: emb(torch.tensor([0.0])))
    text = repr(torch.nn.ModuleList([ColumnParallelLinear(4, 4), RowParallelLinear(4, 4, bias=False),
                                      Linear(4, 2), emb]))
    for piece in ("out_features_per_partition=2", "in_features_per_partition=2, split_input=False",
                  "bias=False", "in_features=4, out_features=2, bias=True", "start_index=", "end_index="):
        assert piece in text, f"{piece!r} not in {text}"


@pytest.mark.world_size(2)
def test_layers_world2_tp2(spawn: Any) -> None:
    # one spawned run for every layer plus the bad-input checks
    assert spawn(_tp2_layers_and_errors, tp_size=2) == [2, 2]


def _check_projection_loss() -> None:
    """VPEmbedding(projection=True) feeds FusedCrossEntropy(parallel=True): (N, V/tp) logits of all
    rows, global target ids; loss and gradients equal F.cross_entropy on the whole logits."""
    from bmt_optim.loss import FusedCrossEntropy

    tp = bmt_comm.get_context().comms.tp
    gen = torch.Generator().manual_seed(5)
    table = torch.randn(VOCAB, DIM, generator=gen)
    x_full = torch.randn(tp.size * ROWS, DIM, generator=gen)
    targets = torch.randint(0, VOCAB, (tp.size * ROWS,), generator=gen)
    ref_table, ref_x = table.clone().requires_grad_(), x_full.clone().requires_grad_()
    ref_loss = F.cross_entropy(F.linear(ref_x, ref_table), targets)
    ref_loss.backward()

    emb = VPEmbedding(VOCAB, DIM, dtype=torch.float32)
    emb.load_state_dict({"weight": table})
    x = _rows(x_full, tp.rank, tp.size).clone().requires_grad_()
    logits = emb(x, projection=True)
    assert logits.shape == (ROWS, tp.size, VOCAB // tp.size)  # 1.0.1's (n, tp*s, V/tp), s = 1 here
    loss = FusedCrossEntropy(parallel=True)(logits.view(-1, VOCAB // tp.size), targets)
    loss.backward()
    _close("parallel cross-entropy loss", loss.detach(), ref_loss.detach())
    assert x.grad is not None and ref_x.grad is not None and ref_table.grad is not None
    _close("projection input grad", x.grad, _rows(ref_x.grad, tp.rank, tp.size))
    p = emb._parameters["weight"]
    assert isinstance(p, DistributedParameter)
    _close("projection weight grad", full_grad(p), ref_table.grad)


def _tp2_layers_and_errors() -> int:
    _check_errors_and_repr()
    _check_projection_loss()
    return _check_all_layers()


@pytest.mark.world_size(4)
@pytest.mark.parametrize("tp", [2, 4])
def test_layers_world4(spawn: Any, tp: int) -> None:
    assert spawn(_check_all_layers, tp_size=tp) == [tp] * 4


@pytest.mark.gpus(2)
@pytest.mark.world_size(2)
def test_layers_gpu_nccl_tp2(spawn: Any) -> None:
    """The same checks on 2 GPUs over NCCL: exercises the tp_comm-stream overlap paths."""
    assert spawn(_check_all_layers_gpu, tp_size=2) == [2, 2]


def _check_all_layers_gpu() -> int:
    assert bmt_comm.get_context().device.type == "cuda"
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 reference comparisons
    return _check_all_layers()


# --- checkpoints: saved under tp 2, loaded under tp 1 ----------------------------------------
class TinyModel(torch.nn.Module):
    """Embedding -> column-parallel -> gelu -> row-parallel -> tied projection."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = VPEmbedding(VOCAB, DIM, dtype=torch.float32)
        self.up = ColumnParallelLinear(DIM, 4 * DIM, dtype=torch.float32)
        self.down = RowParallelLinear(4 * DIM, DIM, dtype=torch.float32)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)  # (n, S, DIM), this rank's rows
        h = h + self.down(F.gelu(self.up(h)))  # up: (N, S, 4*DIM/tp); down: back to (n, S, DIM)
        logits = self.emb(h, projection=True)  # (n, tp*S, VOCAB/tp), 1.0.1's shape
        logits = logits.view(-1, SEQ, logits.shape[-1])  # (N, S, VOCAB/tp): the same memory
        return torch.cat(list(bmt_comm.all_gather(logits.detach(), bmt_comm.get_context().comms.tp).unbind(0)), -1)


def _ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (4 * ROWS, SEQ), generator=torch.Generator().manual_seed(7))


# tensors cross process boundaries as numpy arrays: a torch tensor returned by a rank travels as
# a shared-memory handle that dies with the rank
def _save_under_tp() -> tuple[dict[str, Any], Any]:
    ctx = bmt_comm.get_context()
    model = TinyModel()
    gen = torch.Generator().manual_seed(11 + ctx.rank)  # every shard different
    for p in model.parameters():
        p.data.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    tp = ctx.comms.tp
    ids = _rows(_ids(), tp.rank, tp.size)
    return {k: v.numpy() for k, v in model.state_dict().items()}, model(ids).numpy()


def _load_at_tp1(state: dict[str, Any]) -> Any:
    assert bmt_comm.get_context().comms.tp.size == 1
    model = TinyModel()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    _check_all_layers()  # the layers degenerate to plain ops at tp 1
    return model(_ids()).numpy()


@pytest.mark.world_size(2)
def test_checkpoint_tp2_loads_at_tp1(spawn: Any) -> None:
    saved = spawn(_save_under_tp, tp_size=2)
    state, logits = saved[0]
    assert state["emb.weight"].shape == (VOCAB, DIM)
    assert state["up.weight"].shape == (4 * DIM, DIM) and state["down.weight"].shape == (DIM, 4 * DIM)
    for key in state:
        assert (state[key] == saved[1][0][key]).all(), f"ranks saved different {key}"
    assert (logits == saved[1][1]).all()
    for got in spawn(_load_at_tp1, state, tp_size=1):
        torch.testing.assert_close(torch.from_numpy(got), torch.from_numpy(logits), atol=ATOL, rtol=RTOL)
