"""bmt-zero on 2 GPUs (NCCL): gather and its gradient, DistributedModule against plain torch on the
same GPU, init_parameters against a one-process init, save/load and sharded checkpoints (also read
back by a CPU/gloo run), and peak GPU memory of a model built from shapes.

Run on a machine with 2 GPUs:  python -m pytest tests/gpu/test_zero_gpu.py -q -s
Tolerances: fp32 with TF32 off, rtol=1e-5 / atol=1e-6 (gradients: sums of 2 ranks' terms in
another order); bf16 gathers are exact.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from tests.harness import run_distributed
from tests.zero._models import PlainMLP, batch, full_tensors, make_dist_mlp, same, store_model
from tests.zero._util import assert_close

pytestmark = [pytest.mark.gpus(2), pytest.mark.world_size(2)]

SHAPES = [(7,), (3, 5), (1,), (0,), (1001,), (64, 33)]


def _gather_and_module() -> None:
    import bmt_comm
    from bmt_zero import DistributedParameter, gather_full

    torch.backends.cuda.matmul.allow_tf32 = False
    ctx = bmt_comm.get_context()
    assert ctx.device.type == "cuda" and ctx.comms.world.device.type == "cuda"
    dev, rank = ctx.device, ctx.rank
    g = torch.Generator().manual_seed(0)
    for shape in SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            full = torch.randn(shape, generator=g).to(dtype)
            p = DistributedParameter(full)
            assert p.device == dev
            assert torch.equal(p.gather().cpu(), full) and torch.equal(gather_full(p).cpu(), full)
            to0 = gather_full(p, dst=0)
            assert (to0 is not None and torch.equal(to0.cpu(), full)) if rank == 0 else to0 is None
            if dtype == torch.float32 and full.numel():
                a = [torch.randn(shape, generator=torch.Generator().manual_seed(9 + r)) for r in range(2)]
                (p.gather() * a[rank].to(dev)).tanh().sum().backward()
                ref = full.clone().requires_grad_(True)
                sum((ref * a[r]).tanh().sum() for r in range(2)).backward()
                assert_close(p.grad.cpu(), ref.grad.reshape(-1)[p._start_partition : p._end_partition],
                             what=f"grad {shape}")

    values = full_tensors()
    model = make_dist_mlp(values).to(dev)
    plain = PlainMLP().to(dev)
    plain.load_state_dict(values)
    x, y = (t.to(dev) for t in batch(rank))
    loss = F.mse_loss(model(x), y)
    loss.backward()
    losses = [F.mse_loss(plain(batch(r)[0].to(dev)), batch(r)[1].to(dev)) for r in range(2)]
    assert_close(loss, losses[rank], what="loss")
    sum(losses).backward()
    for name in ("w1", "b1", "w2", "b2"):
        q = model._parameters[name]
        want = getattr(plain, name).grad.reshape(-1)[q._start_partition : q._end_partition]
        assert_close(q.grad, want, rtol=1e-5, atol=1e-6, what=f"grad {name}")
    sd = model.state_dict()
    assert all(v.device.type == "cpu" for k, v in sd.items() if k != "shift")  # buffers stay on device


def test_gather_and_module_match_torch(spawn):
    spawn(_gather_and_module)


def _init_parameters() -> None:
    import bmt_comm
    from bmt_zero import (
        DistributedModule,
        DistributedParameter,
        ParameterInitializer,
        gather_full,
        init_parameters,
    )

    dev = bmt_comm.get_context().device
    specs = [((13, 7), torch.nn.init.normal_), ((5, 9), torch.nn.init.xavier_uniform_), ((3,), torch.nn.init.ones_)]
    model = DistributedModule()
    for i, (shape, fn) in enumerate(specs):
        model.register_parameter(f"p{i}", DistributedParameter(shape, init_method=ParameterInitializer(fn)))
    init_parameters(model)
    torch.manual_seed(0)  # the seed init_distributed gave every rank
    for i, (shape, fn) in enumerate(specs):
        want = torch.empty(shape, device=dev)
        fn(want)
        assert torch.equal(gather_full(model._parameters[f"p{i}"]), want), i


def test_init_parameters_matches_one_process(spawn):
    spawn(_init_parameters)


def _save_on_gpus(tmp: str) -> None:
    import bmt_comm
    import bmt_zero

    model = store_model()
    assert next(model.parameters()).device.type == "cuda"
    want = {k: v.cpu() for k, v in torch.nn.Module.state_dict(model).items()}
    path = os.path.join(tmp, "gpu.pt")
    bmt_zero.save(model, path)
    if bmt_comm.rank() == 0:
        on_disk = torch.load(path)  # no map_location: everything was moved to CPU
        assert all(v.device.type == "cpu" for v in on_disk.values())
        same(on_disk, want, "file")
    fresh = store_model(scale=0.0)
    bmt_zero.load(fresh, path)
    same({k: v.cpu() for k, v in torch.nn.Module.state_dict(fresh).items()}, want, "load")
    bmt_zero.save(model, os.path.join(tmp, "gpu_nb.pt"), non_blocking=True)
    bmt_zero.save_sharded(model, os.path.join(tmp, "gpu_sharded"))
    again = store_model(scale=0.0)
    bmt_zero.load_sharded(again, os.path.join(tmp, "gpu_sharded"))
    same({k: v.cpu() for k, v in torch.nn.Module.state_dict(again).items()}, want, "load_sharded")


def _read_on_cpu(tmp: str) -> None:
    import bmt_comm
    import bmt_zero

    assert bmt_comm.get_context().device.type == "cpu"
    want = torch.nn.Module.state_dict(store_model())
    for loader, name in ((bmt_zero.load, "gpu.pt"), (bmt_zero.load, "gpu_nb.pt"),
                         (bmt_zero.load_sharded, "gpu_sharded")):
        model = store_model(scale=0.0)
        loader(model, os.path.join(tmp, name))
        same(torch.nn.Module.state_dict(model), want, f"cpu reads {name}")


def test_checkpoints_on_gpus_read_back_on_cpu(spawn, tmp_path):
    spawn(_save_on_gpus, str(tmp_path))
    run_distributed(_read_on_cpu, 1, str(tmp_path), env={"CUDA_VISIBLE_DEVICES": ""}, init_kwargs={})


def _peak_memory() -> dict[str, float]:
    from bmt_zero import DistributedModule, DistributedParameter, ParameterInitializer, init_parameters

    n, rows, cols = 16, 4096, 4096  # 16 x 64 MiB fp32 = 1 GiB
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    model = DistributedModule()
    init = ParameterInitializer(torch.nn.init.normal_, std=0.02)
    for i in range(n):
        model.register_parameter(f"w{i}", DistributedParameter((rows, cols), init_method=init))
    init_parameters(model)
    torch.cuda.synchronize()
    mib = 2**20
    r = {"peak_MiB": (torch.cuda.max_memory_allocated() - base) / mib,
         "shards_MiB": sum(p.numel() * 4 for p in model.parameters()) / mib, "largest_MiB": rows * cols * 4 / mib}
    assert r["shards_MiB"] == 512 and r["peak_MiB"] < r["shards_MiB"] + r["largest_MiB"] + 16, r
    return r


def test_peak_memory_of_a_model_built_from_shapes(spawn):
    print("\nGPU memory while building a 1 GiB model from shapes at world size 2:", spawn(_peak_memory))


def test_parameter_reads_and_block_agreement_on_nccl(spawn):
    """One gather per parameter per call (counted on the NCCL communicator), and ranks that build a
    storage differently get the same error (hashes over NCCL, descriptions over gloo)."""
    from tests.zero.test_agreement import _storage_of
    from tests.zero.test_reads import _tied_model_reads

    spawn(_tied_model_reads)
    errors = spawn(_storage_of, "shape")
    assert errors[0] == errors[1] and "'b: shape (5,), tp_split_dim -1' vs 'b: shape (6,)" in errors[0][0], errors
    assert spawn(_storage_of, "same") == [[], []]
