"""BMTrain 1.0.1's module paths and their functions, against plain torch.

The functions of ``bmtrain.loss._function`` and ``bmtrain.optim._function`` are 1.0.1's CUDA
launchers in 1.0.1; here they run in torch on any device (CPU here; the ``gpu`` tests repeat
them on CUDA). Tolerances: half-precision outputs within one rounding of the fp32 reference
(atol 2e-3, rtol 1e-2); fp32 outputs atol 1e-6, rtol 1e-5.
"""

from __future__ import annotations

import struct
from typing import Any

import bmt_comm
import pytest
import torch
import torch.nn.functional as F

HALF = (torch.float16, torch.bfloat16)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _x(shape: tuple[int, ...], dtype: torch.dtype, device: str, seed: int = 0) -> torch.Tensor:
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 3).to(device, dtype)


# --- bmtrain.loss._function ------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [*HALF, torch.float32])
@pytest.mark.parametrize("bad", [None, float("inf"), float("-inf"), float("nan")])
def test_has_inf_nan_writes_one_into_out(device: str, dtype: torch.dtype, bad: float | None) -> None:
    from bmtrain.loss._function import has_inf_nan

    x = _x((3000,), dtype, device)
    if bad is not None:
        x[1234] = bad
    want = int(not bool(torch.isfinite(x.float()).all()))
    out = torch.zeros(1, dtype=torch.uint8, device=device)
    assert has_inf_nan(x, out) is None
    assert out.item() == want
    flag = torch.zeros(1, dtype=torch.uint8, device=device)[0]  # 1.0.1's OptimManager passes a 0-d flag
    has_inf_nan(x, flag)
    assert flag.item() == want
    sticky = torch.ones(1, dtype=torch.uint8, device=device)
    has_inf_nan(_x((10,), dtype, device), sticky)  # a finite tensor leaves a set flag set
    assert sticky.item() == 1


def test_has_inf_nan_rejects_what_1_0_1_rejects() -> None:
    from bmtrain.loss._function import has_inf_nan

    with pytest.raises(TypeError, match="out must be a torch.uint8 tensor, got torch.int32"):
        has_inf_nan(torch.zeros(2, dtype=torch.half), torch.zeros(1, dtype=torch.int32))
    with pytest.raises(ValueError, match="g_half must be a floating-point tensor, got torch.int64"):
        has_inf_nan(torch.zeros(2, dtype=torch.long), torch.zeros(1, dtype=torch.uint8))


def _targets(m: int, n: int, device: str, ignore: int) -> torch.Tensor:
    t = torch.randint(0, n, (m,), generator=torch.Generator().manual_seed(1))
    t[::4] = ignore
    return t.to(device, torch.int32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [*HALF, torch.float32])
def test_cross_entropy_forward_and_backward_inplace(device: str, dtype: torch.dtype) -> None:
    from bmtrain.loss._function import cross_entropy_backward_inplace, cross_entropy_forward

    m, n, ignore = 37, 301, -100
    x = _x((m, n), dtype, device)
    t = _targets(m, n, device, ignore)
    softmax = torch.empty_like(x)
    out = torch.full((m,), 7.0, device=device)
    cross_entropy_forward(m, n, x, t, softmax, out, ignore)
    torch.testing.assert_close(softmax, torch.softmax(x.float(), 1).to(dtype), atol=2e-3, rtol=1e-2)
    want = F.cross_entropy(x.float(), t.long(), ignore_index=ignore, reduction="none")
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    assert (out[::4] == 0).all()

    g = torch.rand(m, generator=torch.Generator().manual_seed(2)).to(device)
    hit = F.one_hot(t.long().clamp_min(0), n).float() * (t.long() >= 0).float()[:, None]
    want_grad = ((softmax.float() - hit) * g[:, None]).to(dtype)
    cross_entropy_backward_inplace(m, n, g, t, softmax, ignore)
    torch.testing.assert_close(softmax, want_grad, atol=2e-3, rtol=1e-2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", HALF)
def test_fused_sumexp_and_softmax_inplace(device: str, dtype: torch.dtype) -> None:
    from bmtrain.loss._function import fused_softmax_inplace, fused_sumexp

    x = _x((9, 1000), dtype, device)
    mx = x.float().amax(1)
    s = fused_sumexp(x, mx)
    assert s.dtype == torch.float32 and s.shape == (9,)
    torch.testing.assert_close(s, torch.exp(x.float() - mx[:, None]).sum(1), atol=1e-6, rtol=1e-5)
    y = x.clone()
    fused_softmax_inplace(y, mx, s)
    torch.testing.assert_close(y, torch.softmax(x.float(), 1).to(dtype), atol=2e-3, rtol=1e-2)


# --- bmtrain.loss.cross_entropy ----------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", HALF)
def test_op_fused_cross_entropy_matches_torch(device: str, dtype: torch.dtype) -> None:
    from bmtrain.loss.cross_entropy import OpFusedCrossEntropy

    x = _x((20, 50), dtype, device).requires_grad_()
    t = _targets(20, 50, device, -100)
    ref = x.detach().float().requires_grad_()
    loss = OpFusedCrossEntropy.apply(x, t, -100)
    want = F.cross_entropy(ref, t.long(), ignore_index=-100, reduction="none")
    torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-5)
    g = torch.rand(20, device=device)
    (loss * g).sum().backward()
    (want * g).sum().backward()
    assert x.grad is not None and ref.grad is not None
    # 1.0.1's backward kernel ignores ignore_index: an ignored row (loss 0) still gets softmax * g;
    # FusedCrossEntropy weights those rows with 0, so its gradient there is 0
    want_grad = torch.where((t == -100)[:, None], torch.softmax(ref.detach(), 1) * g[:, None], ref.grad)
    torch.testing.assert_close(x.grad.float(), want_grad, atol=2e-3, rtol=1e-2)


def test_fused_cross_entropy_positional_arguments_and_state_dict() -> None:
    from bmtrain.loss import FusedCrossEntropy

    w = torch.rand(5)
    loss = FusedCrossEntropy(w, -1, "sum", 0.0, True)  # 1.0.1's order: the fifth is parallel
    assert loss.parallel is True and loss.inplace is False and loss.reduction == "sum"
    model = torch.nn.Sequential(torch.nn.Linear(3, 5))
    model.add_module("loss", loss)
    assert list(model.state_dict()) == ["0.weight", "0.bias"], "1.0.1 keeps the class weights out of state_dict"


def _vp_loss(m: int, vocab: int) -> tuple[Any, Any, Any]:
    from bmtrain.loss.cross_entropy import VPFusedCrossEntropy

    tp = bmt_comm.get_context().comms.tp
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(m, vocab, generator=gen)
    t = torch.randint(0, vocab, (m,), generator=gen)
    g = torch.rand(m, generator=gen)
    part = vocab // tp.size
    mine = logits[:, tp.rank * part : (tp.rank + 1) * part].clone().requires_grad_()
    loss = VPFusedCrossEntropy.apply(mine, t)
    (loss * g).sum().backward()
    assert mine.grad is not None
    return loss.detach().numpy(), mine.grad.numpy(), (logits.numpy(), t.numpy(), g.numpy())


@pytest.mark.parametrize("world_size", [1, 2])
def test_vp_fused_cross_entropy_matches_torch(spawn: Any, world_size: int) -> None:
    results = spawn(_vp_loss, 6, 10, tp_size=world_size)
    logits, t, g = (torch.from_numpy(a) for a in results[0][2])
    ref = logits.clone().requires_grad_()
    want = F.cross_entropy(ref, t, reduction="none")
    (want * g).sum().backward()
    assert ref.grad is not None
    part = 10 // world_size
    for r, (loss, grad, _) in enumerate(results):
        torch.testing.assert_close(torch.from_numpy(loss), want.detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(torch.from_numpy(grad), ref.grad[:, r * part : (r + 1) * part], atol=1e-6, rtol=1e-5)


# --- bmtrain.optim._function / optim_manager / _distributed ---------------------------------------
def _bf16_truncated(v: float) -> float:
    (bits,) = struct.unpack("<I", struct.pack("<f", v))
    (out,) = struct.unpack("<f", struct.pack("<I", bits & 0xFFFF0000))
    return float(out)


def test_bf16_from_fp32_truncates_as_1_0_1_and_fp16_rounds() -> None:
    from bmtrain.optim._function import bf16_from_fp32, fp16_from_fp32

    x = torch.cat([_x((1000,), torch.float32, "cpu"), torch.tensor([1 + 3 * 2**-9, -(1 + 3 * 2**-9), 0.0, -0.0])])
    b = bf16_from_fp32(x)
    assert b.dtype == torch.bfloat16 and b.shape == x.shape
    assert b.float().tolist() == [_bf16_truncated(v) for v in x.tolist()]
    assert b[-4].item() == 1.0 and x[-4:-3].to(torch.bfloat16).item() == 1 + 2**-7  # truncated, not rounded
    h = fp16_from_fp32(x)
    assert h.dtype == torch.float16 and torch.equal(h, x.half())
    with pytest.raises(TypeError, match="param_fp32 must be a float32 tensor, got torch.float16"):
        bf16_from_fp32(h)


def test_check_overflow_and_grad_rescale() -> None:
    from bmt_optim import OptimManager as Component
    from bmtrain.optim.optim_manager import OptimManager, check_overflow, grad_rescale

    assert OptimManager is Component
    half = torch.nn.Parameter(torch.zeros(4, dtype=torch.half))
    full = torch.nn.Parameter(torch.zeros(4))
    half.grad = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.half)
    full.grad = torch.tensor([float("inf"), 1.0, 1.0, 1.0])
    groups = [{"params": [half, full]}]
    check_overflow(groups)  # 1.0.1 looks at non-fp32 gradients only
    half.grad[2] = float("nan")
    with pytest.raises(OverflowError, match="Gradient overflow"):
        check_overflow(groups)
    half.grad = torch.tensor([2.0, 4.0, 6.0, 8.0], dtype=torch.half)
    full.grad = torch.tensor([3.0, 6.0, 9.0, 12.0])
    frozen = torch.nn.Parameter(torch.zeros(1), requires_grad=False)
    frozen.grad = torch.tensor([5.0])
    grad_rescale([{"params": [half, full, frozen]}], 2.0)
    assert half.grad.tolist() == [1.0, 2.0, 3.0, 4.0] and full.grad.tolist() == [1.5, 3.0, 4.5, 6.0]
    assert frozen.grad.tolist() == [5.0]


def _overflow_on_one_rank() -> bool:
    from bmtrain.optim.optim_manager import check_overflow

    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))
    p.grad = torch.ones(3, dtype=torch.bfloat16)
    if bmt_comm.get_context().rank == 1:
        p.grad[0] = float("inf")
    try:
        check_overflow([{"params": [p]}])
    except OverflowError:
        return True
    return False


@pytest.mark.world_size(2)
def test_check_overflow_is_collective(spawn: Any) -> None:
    assert spawn(_overflow_on_one_rank) == [True, True]


def _gather_state() -> dict[int, dict[str, Any]]:
    from bmtrain.optim._distributed import state_dict_gather

    r = bmt_comm.get_context().rank
    state: dict[int, dict[str, Any]] = {
        0: {"step": 3, "exp_avg": torch.full((2 + r,), float(r)), "exp_avg_sq": torch.arange(2.0 + r),
            "_param_fp32": torch.full((2 + r,), -1e15)},
    }
    if r == 0:
        state[1] = {"step": 3, "exp_avg": torch.ones(2), "exp_avg_sq": torch.ones(2), "_param_fp32": torch.ones(2)}
    sd = {"state": state, "param_groups": [{"params": [0, 1]}]}
    out = state_dict_gather(sd)
    assert out is sd
    return {k: {n: (t.tolist() if isinstance(t, torch.Tensor) else t) for n, t in v.items()} for k, v in out["state"].items()}


@pytest.mark.world_size(2)
def test_state_dict_gather_concatenates_in_rank_order(spawn: Any) -> None:
    for got in spawn(_gather_state):
        assert got[0] == {"step": 3, "exp_avg": [0.0, 0.0, 1.0, 1.0, 1.0], "exp_avg_sq": [0.0, 1.0, 0.0, 1.0, 2.0],
                          "_param_fp32": [torch.tensor(-1e15).item()] * 5}  # 1.0.1 drops these
        assert got[1] == {"step": 3, "exp_avg": [1.0, 1.0], "exp_avg_sq": [1.0, 1.0], "_param_fp32": [1.0, 1.0]}


# --- bmtrain.benchmark.* / re-exported submodules ---------------------------------------------
def test_benchmark_shape_and_size_labels() -> None:
    from bmtrain.benchmark.shape import SHAPES
    from bmtrain.benchmark.utils import format_size, format_size_

    assert SHAPES == [2**i for i in range(10, 33)]
    cases = {512: "512B", 1536: "1.50KB", 3 * 2**20: "3.00MB", 1000 * 2**20: "1000.00MB", 5 * 2**30: "5.00GB"}
    for size, label in cases.items():
        assert format_size_(size) == label
        assert format_size(size) == label[:6]


def test_submodules_hold_the_package_objects() -> None:
    import bmtrain as bmt
    import bmtrain.benchmark as bench
    from bmtrain.benchmark.all_gather import all_gather
    from bmtrain.lr_scheduler.cosine import Cosine
    from bmtrain.lr_scheduler.warmup import WarmupLRScheduler
    from bmtrain.nn.parallel_embedding import VPEmbedding
    from bmtrain.nn.parallel_linear_func import OpParallelLinear, ReduceType
    from bmtrain.optim.adam import AdamOptimizer
    from bmtrain.optim.adam_offload import AdamOffloadOptimizer

    assert bench.all_gather is all_gather and callable(all_gather)
    assert (Cosine, WarmupLRScheduler) == (bmt.lr_scheduler.Cosine, bmt.lr_scheduler.WarmupLRScheduler)
    assert (VPEmbedding, OpParallelLinear, ReduceType) == (bmt.nn.VPEmbedding, bmt.nn.OpParallelLinear, bmt.nn.ReduceType)
    assert (AdamOptimizer, AdamOffloadOptimizer) == (bmt.optim.AdamOptimizer, bmt.optim.AdamOffloadOptimizer)


def test_nccl_op2nccl_and_enum_aliases() -> None:
    import bmtrain.nccl as nccl
    from bmtrain.nccl import enums

    assert [nccl.op2nccl(op) for op in ("sum", "prod", "max", "min", "avg")] == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="op must be one of .*got 'mean'"):
        nccl.op2nccl("mean")
    aliases = {"ncclInt": 2, "ncclHalf": 6, "ncclFloat": 7, "ncclDouble": 8}
    assert {k: getattr(enums, k) for k in aliases} == aliases


# --- argument names and helpers users call by 1.0.1's names -----------------------------------
def test_keyword_names_of_1_0_1() -> None:
    import inspect

    import bmtrain as bmt

    assert list(inspect.signature(bmt.distributed.broadcast).parameters) == ["src", "root", "comm"]
    assert list(inspect.signature(bmt.distributed.send_activations).parameters) == ["hidden_state", "next_rank", "comm"]
    bmt.debug.clear()
    bmt.debug.extend(key="k", value=[1, 2])
    bmt.debug.append("k", 3)
    assert bmt.debug.DEBUG_VARS == {"k": [1, 2, 3]} and bmt.debug.get("k") == [1, 2, 3]
    bmt.debug.clear()
    assert bmt.debug.DEBUG_VARS == {}


def _broadcast_by_keyword() -> list[float]:
    import bmtrain as bmt

    x = torch.full((2,), float(bmt_comm.get_context().rank + 1))
    return bmt.distributed.broadcast(src=x, root=1).tolist()


@pytest.mark.world_size(2)
def test_broadcast_src_keyword(spawn: Any) -> None:
    assert spawn(_broadcast_by_keyword) == [[2.0, 2.0], [2.0, 2.0]]


def _param_init_helpers() -> list[Any]:
    import bmtrain as bmt
    from bmtrain.param_init import init_distributed_parameter, iterate_parameters
    from bmtrain.wrapper import make_distributed, model_wrapper_dispatch

    p = bmt.DistributedParameter(torch.empty(4, 3), init_method=lambda t: torch.nn.init.constant_(t, 0.5))
    plain = torch.nn.Parameter(torch.zeros(2))
    init_distributed_parameter([p, plain])
    module = torch.nn.Module()
    module.a, module.b = plain, p
    listed = list(iterate_parameters(module))
    block = bmt.Block(bmt.nn.Linear(3, 3, dtype=torch.float32))
    in_block = list(iterate_parameters(block._module))

    torch.manual_seed(0)
    made = make_distributed(torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.ModuleList([torch.nn.Linear(3, 3)])))
    assert model_wrapper_dispatch(made) is made
    return [
        p.gather().tolist(), plain.tolist(), [x is y for x, y in zip(listed, [plain, p], strict=True)], in_block,
        isinstance(made[0]._parameters["weight"], bmt.DistributedParameter), isinstance(made[1][0], bmt.Block),
    ]


@pytest.mark.world_size(2)
def test_param_init_and_wrapper_helpers(spawn: Any) -> None:
    for got in spawn(_param_init_helpers):
        assert got == [[[0.5] * 3] * 4, [0.0, 0.0], [True, True], [], True, True]


def _sum_loss_backward() -> list[float]:
    import bmtrain as bmt

    r = bmt_comm.get_context().rank
    w = torch.tensor([1.0 + r], requires_grad=True)
    mean = bmt.sum_loss((w * 3).sum())  # 1.0.1: an all-reduce avg that back-propagates
    mean.backward()
    assert w.grad is not None
    return [mean.item(), w.grad.item()]


@pytest.mark.world_size(2)
def test_sum_loss_is_differentiable(spawn: Any) -> None:
    assert spawn(_sum_loss_backward) == [[4.5, 1.5], [4.5, 1.5]]


def test_inspect_tensor_manager_and_print_constants() -> None:
    import io

    import bmtrain as bmt
    from bmtrain.inspect.tensor import InspectTensor, InspectTensorManager
    from bmtrain.utils import ALIGN, ROW_WIDTH

    manager = bmt.inspect.inspect_tensor()
    assert isinstance(manager, InspectTensorManager)
    with manager as inspector:
        assert isinstance(inspector, InspectTensor)
        with pytest.raises(RuntimeError, match="cannot be nested"):
            InspectTensorManager().__enter__()
    with bmt.inspect.inspect_tensor():  # usable again once closed
        pass
    assert (ALIGN, ROW_WIDTH) == (4, 60)
    out = io.StringIO()
    bmt.print_dict("t", {"ab": 1, "abcdefgh": "x" * 100}, file=out)
    lines = out.getvalue().splitlines()
    body = [line for line in lines if line.startswith("ab")]
    assert body and all(len(line) <= ROW_WIDTH for line in lines), lines
    key_col = len("abcdefgh :") + (-len("abcdefgh :")) % ALIGN  # rounded up to ALIGN
    assert body[1][key_col:].startswith("x"), body
