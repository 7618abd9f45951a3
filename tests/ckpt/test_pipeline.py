"""Pipeline parallelism: layer partition and micro-batch arithmetic (no process group), and
training through PipelineTransformerBlockList against plain torch in one process."""

from __future__ import annotations

import bmt_comm
import pytest
import torch
import torch.nn.functional as F
from bmt_ckpt.pipe_schedule import MicroBatches, StagePartition


@pytest.mark.parametrize("layers,stages", [(1, 1), (5, 2), (7, 3), (8, 4), (4, 4), (13, 5)])
def test_partition_covers_layers_in_order(layers: int, stages: int) -> None:
    part = StagePartition(layers, stages)
    ranges = [part.range_of(s) for s in range(stages)]
    assert [i for r in ranges for i in r] == list(range(layers))
    for s, r in enumerate(ranges):
        assert len(r) == part.part_len(s) == layers // stages + (s < layers % stages)
        assert all(part.stage_of(i) == s for i in r)


def test_partition_errors() -> None:
    with pytest.raises(ValueError, match=r"a pipeline of 4 stages needs at least 4 layers \(one per stage\), got 3"):
        StagePartition(3, 4)
    part = StagePartition(5, 2)
    with pytest.raises(ValueError, match=r"stage_id \(2\) must be in \[0, 2\)"):
        part.range_of(2)
    with pytest.raises(ValueError, match=r"layer_id \(5\) must be in \[0, 5\)"):
        part.stage_of(5)


def test_micro_batches() -> None:
    mb = MicroBatches(local=3, members=2, micros=4)
    assert mb.total == 6 and mb.sizes == (2, 2, 1, 1)
    assert [mb.rows_of_member(m) for m in range(2)] == [range(0, 3), range(3, 6)]
    assert MicroBatches(4, 2, 2).sizes == (4, 4)
    with pytest.raises(ValueError, match=r"pipe group's batch \(2 ranks x 1 rows = 2\) must have at least num_micro_batches \(3\) rows"):
        MicroBatches(1, 2, 3)
    with pytest.raises(ValueError, match=r"num_micro_batches must be >= 1, got 0"):
        MicroBatches(1, 2, 0)


# --- training against plain torch ------------------------------------------------------------
DIM, LAYERS, LOCAL, LR, STEPS = 4, 5, 2, 0.003, 10
ATOL, RTOL = 1e-5, 1e-4  # fp32; only summation order differs
# parameter names of a layer: plain DistributedParameters, or tensor-parallel sublayers
NAMES = {
    False: {"w1": "w1", "b1": "b1", "w2": "w2", "b2": "b2"},
    True: {"w1": "up.weight", "b1": "up.bias", "w2": "down.weight", "b2": "down.bias"},
}


def _layer_fn(p: dict[str, torch.Tensor], h: torch.Tensor, scale: torch.Tensor, alpha: float) -> torch.Tensor:
    """A residual MLP; each row of the output depends on that row of the input only."""
    return h + alpha * F.linear(torch.tanh(F.linear(h, p["w1"], p["b1"])), p["w2"], p["b2"]) * scale


def _make_layer(tp: bool, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    from bmt_zero import DistributedModule, DistributedParameter
    from bmt_zero.nn import ColumnParallelLinear, RowParallelLinear

    class ResLayer(DistributedModule):
        def __init__(self) -> None:
            super().__init__()
            self.w1 = DistributedParameter(torch.empty(2 * DIM, DIM, device="meta", dtype=dtype))
            self.b1 = DistributedParameter(torch.empty(2 * DIM, device="meta", dtype=dtype))
            self.w2 = DistributedParameter(torch.empty(DIM, 2 * DIM, device="meta", dtype=dtype))
            self.b2 = DistributedParameter(torch.empty(DIM, device="meta", dtype=dtype))

        def forward(self, h: torch.Tensor, scale: torch.Tensor, alpha: float) -> torch.Tensor:
            return _layer_fn({"w1": self.w1, "b1": self.b1, "w2": self.w2, "b2": self.b2}, h, scale, alpha)

    class TPResLayer(DistributedModule):
        """Rows sharded over tp: column-parallel up (gathers them), row-parallel down (scatters)."""

        def __init__(self) -> None:
            super().__init__()
            self.up = ColumnParallelLinear(DIM, 2 * DIM, dtype=dtype)
            self.down = RowParallelLinear(2 * DIM, DIM, dtype=dtype)

        def forward(self, h: torch.Tensor, scale: torch.Tensor, alpha: float) -> torch.Tensor:
            return h + alpha * self.down(torch.tanh(self.up(h))) * scale

    return TPResLayer() if tp else ResLayer()


def _full_weights(tp: bool) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    names = NAMES[tp]
    out = {}
    for i in range(LAYERS):
        out[f"{i}.{names['w1']}"] = torch.randn(2 * DIM, DIM, generator=gen) * 0.5
        out[f"{i}.{names['b1']}"] = torch.randn(2 * DIM, generator=gen) * 0.1
        out[f"{i}.{names['w2']}"] = torch.randn(DIM, 2 * DIM, generator=gen) * 0.5
        out[f"{i}.{names['b2']}"] = torch.randn(DIM, generator=gen) * 0.1
    return out


def _batch(step: int, world: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(x, scale, target) of every rank for this step."""
    gen = torch.Generator().manual_seed(1000 + step)
    return [
        (torch.randn(LOCAL, DIM, generator=gen), torch.rand(LOCAL, DIM, generator=gen) + 0.5,
         torch.randn(LOCAL, DIM, generator=gen))
        for _ in range(world)
    ]


def _reference(world: int, tp: bool) -> tuple[list[list[float]], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Plain torch, one process, every rank's batch: each step's per-rank losses (SGD on their
    sum), the final weights, and step 0's gradients of each rank's x and scale and the layer inputs."""
    params = {k: v.clone().requires_grad_() for k, v in _full_weights(tp).items()}
    names = NAMES[tp]
    losses, first = [], {}
    for step in range(STEPS):
        per_rank = []
        for r, (x, scale, target) in enumerate(_batch(step, world)):
            x, scale = x.clone().requires_grad_(), scale.clone().requires_grad_()
            h, inputs = x, []
            for i in range(LAYERS):
                inputs.append(h)
                h = _layer_fn({k: params[f"{i}.{n}"] for k, n in names.items()}, h, scale, 0.7)
            loss = ((h - target) ** 2).sum()
            loss.backward()
            per_rank.append(loss.item())
            if step == 0:
                first[f"x{r}"], first[f"scale{r}"] = x.grad, scale.grad
                first[f"hidden{r}"] = torch.stack(inputs).detach()
        losses.append(per_rank)
        with torch.no_grad():
            for p in params.values():
                p -= LR * p.grad
                p.grad = None
    return losses, {k: v.detach() for k, v in params.items()}, first


def _close(got: torch.Tensor, want: torch.Tensor, atol: float, rtol: float, what: str, bf16: bool) -> None:
    """fp32: elementwise. bf16: the error's norm relative to the tensor's (elementwise is too
    strict where a difference such as out - target cancels most of bf16's 8 mantissa bits)."""
    got = got.float().cpu()
    if not bf16:
        torch.testing.assert_close(got, want, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")
        return
    err = ((got - want).norm() / want.norm().clamp_min(1e-6)).item()
    assert err <= rtol, f"{what}: relative error {err:.4f} > {rtol} (bf16)"


def _train_pipeline(pipelined: bool = True, dtype: torch.dtype = torch.float32) -> list[float]:
    """10 SGD steps through the pipeline (or, with ``pipelined=False``, a TransformerBlockList);
    losses, step 0's input gradients and hidden states, and the final gathered weights must match
    the fp32 reference (bf16: to bf16 tolerances)."""
    from bmt_ckpt import TransformerBlockList
    from bmt_ckpt.pipeline import PipelineTransformerBlockList

    ctx = bmt_comm.get_context()
    tp = ctx.comms.tp.size > 1
    ref_losses, ref_params, ref_first = _reference(ctx.world_size, tp)
    layers = [_make_layer(tp, dtype) for _ in range(LAYERS)]
    model: torch.nn.Module
    if pipelined:
        model = PipelineTransformerBlockList(layers)
        assert model.layer_ids == list(model.get_range_by_stage_id(ctx.topology.stage_id))
    else:
        model = TransformerBlockList(layers)
    model.load_state_dict(_full_weights(tp))
    dev = ctx.device
    atol, rtol = (ATOL, RTOL) if dev.type == "cpu" else (10 * ATOL, 10 * RTOL)  # GPU: other summation orders
    bf16 = dtype == torch.bfloat16
    if bf16:
        atol, rtol = 0.0, 3e-2  # relative norm error: bf16 rounds at ~4e-3, over 5 layers and 10 steps
    losses = []
    for step in range(STEPS):
        x, scale, target = (t.to(dev, dtype) for t in _batch(step, ctx.world_size)[ctx.rank])
        x, scale = x.clone().requires_grad_(), scale.clone().requires_grad_()
        if step == 0:
            out, hidden = model(x, scale, 0.7, return_hidden_states=True)
            _close(hidden, ref_first[f"hidden{ctx.rank}"], atol, rtol, "hidden states", bf16)
        else:
            out = model(x, scale, 0.7, batch_related=[0]) if pipelined else model(x, scale, 0.7)
        loss = ((out.float() - target.float()) ** 2).sum()
        loss.backward()
        losses.append(loss.item())
        want = ref_losses[step][ctx.rank]
        assert abs(loss.item() - want) <= atol + rtol * abs(want), f"step {step}: loss {loss.item()} != {want}"
        if step == 0:
            assert x.grad is not None and scale.grad is not None
            _close(x.grad, ref_first[f"x{ctx.rank}"], atol, rtol, "x.grad", bf16)
            _close(scale.grad, ref_first[f"scale{ctx.rank}"], atol, rtol, "scale.grad", bf16)
        with torch.no_grad():
            for block in model:
                for _, flat in block.grouped_parameters():
                    for p in flat:
                        p -= LR * p.grad
                block.zero_grad()
    state = model.state_dict()
    assert sorted(state) == sorted(ref_params), sorted(state)
    for k, v in ref_params.items():
        _close(state[k], v, atol, rtol, k, bf16)
    return losses


def _train_pipeline_gpu(pipelined: bool = True, dtype: torch.dtype = torch.float32) -> list[float]:
    assert bmt_comm.get_context().device.type == "cuda"
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 reference comparisons
    return _train_pipeline(pipelined, dtype)


@pytest.mark.world_size(4)
@pytest.mark.parametrize("tp_size", [1, 2])
def test_pipeline_trains_like_torch(spawn, tp_size: int) -> None:
    results = spawn(_train_pipeline, pipe_size=2, tp_size=tp_size, num_micro_batches=3 if tp_size == 1 else 2)
    assert len(results) == 4 and all(len(r) == STEPS for r in results)


@pytest.mark.world_size(4)
def test_tensor_parallel_block_list_trains_like_torch(spawn) -> None:
    """tp 2 without a pipeline: the tensor-parallel layers in a TransformerBlockList, ZeRO over tp_zero."""
    results = spawn(_train_pipeline, False, tp_size=2)
    assert len(results) == 4 and all(len(r) == STEPS for r in results)


@pytest.mark.gpus(4)
@pytest.mark.world_size(4)
@pytest.mark.parametrize("tp_size", [1, 2])
def test_pipeline_trains_like_torch_gpu(spawn, tp_size: int) -> None:
    """The same on 4 GPUs over NCCL (pipe 2, and pipe 2 x tp 2): exercises the pp_comm stream."""
    results = spawn(_train_pipeline_gpu, pipe_size=2, tp_size=tp_size, num_micro_batches=2)
    assert len(results) == 4 and all(len(r) == STEPS for r in results)


@pytest.mark.gpus(4)
@pytest.mark.world_size(4)
@pytest.mark.parametrize("pipe_size,tp_size", [(1, 2), (2, 1), (2, 2)])
def test_parallel_training_bf16_gpu(spawn, pipe_size: int, tp_size: int) -> None:
    """bf16 on 4 GPUs: tp 2, pipe 2 and tp 2 x pipe 2 against the fp32 plain-torch reference."""
    results = spawn(
        _train_pipeline_gpu, pipe_size > 1, torch.bfloat16, pipe_size=pipe_size, tp_size=tp_size, num_micro_batches=2
    )
    assert len(results) == 4 and all(len(r) == STEPS for r in results)


# --- construction errors, state dicts, checkpoints ------------------------------------------------
def _checkpoints_and_errors(path: str) -> None:
    from bmt_ckpt import Block
    from bmt_ckpt.pipeline import PipelineTransformerBlockList
    from bmt_zero import load, save
    from bmt_zero.gather import gather_to

    ctx = bmt_comm.get_context()
    with pytest.raises(ValueError, match=r"a pipeline of 2 stages needs at least 2 layers \(one per stage\), got 1"):
        PipelineTransformerBlockList([_make_layer(False)])
    with pytest.raises(ValueError, match=r"needs Blocks built with mode='PIPE'"):
        PipelineTransformerBlockList([Block(_make_layer(False)), _make_layer(False)])
    with pytest.raises(ValueError, match=r"one hidden state \(num_hidden=1\), got 2"):
        PipelineTransformerBlockList([_make_layer(False), _make_layer(False)], num_hidden=2)

    full = _full_weights(False)
    model = PipelineTransformerBlockList([_make_layer(False) for _ in range(LAYERS)])
    assert len(model) == LAYERS and [model.get_stage_by_layer_id(i) for i in range(LAYERS)] == [0, 0, 0, 1, 1]
    other, other_stage = (4, 1) if ctx.topology.stage_id == 0 else (0, 0)
    with pytest.raises(IndexError, match=rf"layer {other} runs on pipeline stage {other_stage}"):
        model[other]
    assert [b is model[i] for i, b in zip(model.layer_ids, model, strict=True)] == [True] * len(model.layer_ids)
    bad = dict(full)
    bad["9.w1"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match=r'Unexpected key\(s\) in state_dict: "9.w1"'):
        model.load_state_dict(bad)
    partial = {k: v for k, v in full.items() if k != "4.b2"}
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "4.b2"'):
        model.load_state_dict(partial)
    model.load_state_dict(full)

    # every rank gets every layer; inside gather_to(0) only rank 0 does
    state = model.state_dict()
    assert list(state) == list(full), list(state)
    for k, v in full.items():
        assert torch.equal(state[k], v), k
    with gather_to(0):
        only0 = model.state_dict()
    assert (list(only0) == list(full)) if ctx.rank == 0 else not only0, list(only0)

    # bmt.save funnels every stage's layers into one file; a plain load_state_dict restores them
    save(model, path)
    on_disk = torch.load(path)
    assert list(on_disk) == list(full), list(on_disk)
    for k, v in full.items():
        torch.testing.assert_close(on_disk[k], v, msg=lambda m, k=k: f"{k}: {m}")

    # bmt.load: rank 0 reads the file, each stage's ranks receive their own layers' pieces
    fresh = PipelineTransformerBlockList([_make_layer(False) for _ in range(LAYERS)])
    result = load(fresh, path)
    assert (result.missing_keys, result.unexpected_keys) == ([], [])
    _same_state(fresh.state_dict(), state)

    # inference under no_grad gives what the training forward gives, and so does the loaded copy
    x, scale, _ = _batch(0, ctx.world_size)[ctx.rank]
    with torch.no_grad():
        plain = model(x, scale, 0.7)
    torch.testing.assert_close(model(x, scale, 0.7).detach(), plain)
    assert torch.equal(fresh(x, scale, 0.7).detach(), plain)


@pytest.mark.world_size(2)
def test_pipeline_checkpoints_and_errors(spawn, tmp_path) -> None:
    spawn(_checkpoints_and_errors, str(tmp_path / "pipe.pt"), pipe_size=2, num_micro_batches=2)


# --- bmt.load into a pipeline, from a pipeline's checkpoint or a TransformerBlockList's -------------
class _PlainLayer(torch.nn.Module):
    """A layer's parameters under the same names in plain torch: torch's own load report."""

    def __init__(self, tp: bool) -> None:
        super().__init__()
        if tp:
            self.up = torch.nn.Linear(DIM, 2 * DIM)
            self.down = torch.nn.Linear(2 * DIM, DIM)
        else:
            self.w1 = torch.nn.Parameter(torch.empty(2 * DIM, DIM))
            self.b1 = torch.nn.Parameter(torch.empty(2 * DIM))
            self.w2 = torch.nn.Parameter(torch.empty(DIM, 2 * DIM))
            self.b2 = torch.nn.Parameter(torch.empty(DIM))


def _saved_weights(tp: bool, which: int) -> dict[str, torch.Tensor]:
    """Weights unlike a fresh model's, ``which`` telling apart the two checkpoints of a test."""
    return {k: v * (1.5 + which) - 0.25 * which for k, v in _full_weights(tp).items()}


def _same_state(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want), (list(got), list(want))
    for k, v in want.items():
        assert torch.equal(got[k].cpu(), v.cpu()), k


def _reference_output(weights: dict[str, torch.Tensor], x: torch.Tensor, scale: torch.Tensor, tp: bool) -> torch.Tensor:
    h = x
    for i in range(LAYERS):
        h = _layer_fn({k: weights[f"{i}.{n}"] for k, n in NAMES[tp].items()}, h, scale, 0.7)
    return h


def _tolerances() -> tuple[float, float]:
    if bmt_comm.get_context().device.type == "cpu":
        return ATOL, RTOL
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 reference comparisons
    return 10 * ATOL, 10 * RTOL  # GPU: other summation orders


def _block_list_checkpoints(directory: str, save: bool) -> None:
    """World 2, no pipeline: a TransformerBlockList of both kinds of layer (tp ones at tp_size 1)
    writes ``blocks-<tp>.pt`` (``save``) or loads the pipelines' ``pipe-<tp>.pt``."""
    from bmt_ckpt import TransformerBlockList
    from bmt_zero import load
    from bmt_zero import save as bmt_save

    ctx = bmt_comm.get_context()
    atol, rtol = _tolerances()
    for tp in (False, True):
        model = TransformerBlockList([_make_layer(tp) for _ in range(LAYERS)])
        if save:
            model.load_state_dict(_saved_weights(tp, 0))
            bmt_save(model, f"{directory}/blocks-{int(tp)}.pt")
            continue
        want = _saved_weights(tp, 1)
        result = load(model, f"{directory}/pipe-{int(tp)}.pt")
        assert (result.missing_keys, result.unexpected_keys) == ([], [])
        _same_state(model.state_dict(), want)
        x, scale, _ = _batch(0, ctx.world_size)[ctx.rank]
        out = model(x.to(ctx.device), scale.to(ctx.device), 0.7).detach()
        _close(out, _reference_output(want, x, scale, tp), atol, rtol, "output", False)


def _pipeline_bmt_load(directory: str) -> str:
    """World 4, pipe 2 (x tp 2): ``bmt_zero.load`` of a block list's checkpoint and of the
    pipeline's own; missing/unexpected keys of both stages reported alike on every rank."""
    from bmt_ckpt.pipeline import PipelineTransformerBlockList
    from bmt_zero import load, save

    ctx = bmt_comm.get_context()
    tp = ctx.comms.tp.size > 1
    names = NAMES[tp]
    atol, rtol = _tolerances()
    x_cpu, scale_cpu, _ = _batch(0, ctx.world_size)[ctx.rank]
    x, scale = x_cpu.to(ctx.device), scale_cpu.to(ctx.device)

    def build() -> PipelineTransformerBlockList:
        return PipelineTransformerBlockList([_make_layer(tp) for _ in range(LAYERS)])

    # the same layers saved from a TransformerBlockList at world 2
    model = build()
    blocks = _saved_weights(tp, 0)
    result = load(model, f"{directory}/blocks-{int(tp)}.pt")
    assert (result.missing_keys, result.unexpected_keys) == ([], [])
    _same_state(model.state_dict(), blocks)
    out = model(x, scale, 0.7).detach()
    _close(out, _reference_output(blocks, x_cpu, scale_cpu, tp), atol, rtol, "output", False)

    # the pipeline's own checkpoint into a freshly built pipeline: same state, same outputs
    model.load_state_dict(_saved_weights(tp, 1))
    path = f"{directory}/pipe-{int(tp)}.pt"
    save(model, path)
    fresh = build()
    load(fresh, path)
    _same_state(fresh.state_dict(), _saved_weights(tp, 1))
    assert torch.equal(fresh(x, scale, 0.7).detach(), model(x, scale, 0.7).detach())

    # keys missing from / unexpected in both stages' layers: torch's report, on every rank
    odd = {k: v for k, v in blocks.items() if k not in (f"0.{names['w1']}", f"4.{names['b2']}")}
    odd.update({"3.extra": torch.ones(1), "9.w1": torch.ones(1), "1.extra": torch.ones(1)})
    odd_path = f"{directory}/odd-{int(tp)}.pt"
    if ctx.rank == 0:
        torch.save(odd, odd_path)
    bmt_comm.synchronize()
    torch_says = torch.nn.ModuleList([_PlainLayer(tp) for _ in range(LAYERS)]).load_state_dict(odd, strict=False)
    assert torch_says.missing_keys == [f"0.{names['w1']}", f"4.{names['b2']}"]
    assert torch_says.unexpected_keys == ["9.w1", "1.extra", "3.extra"]
    partial = build()
    got = load(partial, odd_path, strict=False)
    assert (got.missing_keys, got.unexpected_keys) == (torch_says.missing_keys, torch_says.unexpected_keys)
    loaded = partial.state_dict()
    for k, v in odd.items():
        if k in loaded:
            assert torch.equal(loaded[k].cpu(), v), k
    # the same under a prefix, next to other modules' keys (a pipeline inside a model)
    nested = {"junk": torch.ones(1), **{f"enc.{k}": v for k, v in odd.items()}}
    nested_path = f"{directory}/nested-{int(tp)}.pt"
    if ctx.rank == 0:
        torch.save(nested, nested_path)
    bmt_comm.synchronize()
    outer, twin = torch.nn.Module(), torch.nn.Module()
    outer.add_module("enc", build())
    twin.add_module("enc", torch.nn.ModuleList([_PlainLayer(tp) for _ in range(LAYERS)]))
    torch_says = twin.load_state_dict(nested, strict=False)
    got = load(outer, nested_path, strict=False)
    assert (got.missing_keys, got.unexpected_keys) == (torch_says.missing_keys, torch_says.unexpected_keys)
    assert got.unexpected_keys == ["junk", "enc.9.w1", "enc.1.extra", "enc.3.extra"], got.unexpected_keys
    with pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict") as raised:
        load(build(), odd_path)
    return str(raised.value)


def _bmt_load_round_trips(directory: str, gpu: bool) -> None:
    from ..harness import run_distributed

    env = None if gpu else {"CUDA_VISIBLE_DEVICES": ""}  # harness: NCCL on cuda:rank where GPUs are seen
    run_distributed(_block_list_checkpoints, 2, directory, True, env=env)
    for tp in (False, True):
        messages = run_distributed(
            _pipeline_bmt_load, 4, directory, env=env,
            init_kwargs={"pipe_size": 2, "tp_size": 2 if tp else 1, "num_micro_batches": 2},
        )
        names = NAMES[tp]
        assert len(set(messages)) == 1, messages  # every rank raised the same error
        assert (
            f'Missing key(s) in state_dict: "0.{names["w1"]}", "4.{names["b2"]}". ' in messages[0]
            and 'Unexpected key(s) in state_dict: "9.w1", "1.extra", "3.extra". ' in messages[0]
        ), messages[0]
    run_distributed(_block_list_checkpoints, 2, directory, False, env=env)


def test_pipeline_bmt_load(tmp_path) -> None:
    """bmt_zero.load into pipelines (world 4: pipe 2, and pipe 2 x tp 2) from their own checkpoints
    and from TransformerBlockList's (world 2), and the other way round; strict errors everywhere."""
    _bmt_load_round_trips(str(tmp_path), gpu=False)


@pytest.mark.gpus(4)
def test_pipeline_bmt_load_gpu(tmp_path) -> None:
    """The same on GPUs over NCCL (the file is still read on rank 0's CPU)."""
    _bmt_load_round_trips(str(tmp_path), gpu=True)
