"""Blocks on 2 GPUs (NCCL): training equals plain torch (fp32 and bf16), peak memory of a 24-block
model stays near two blocks' full parameters, and a profiler trace shows the all-gathers and
reduce-scatters running on the load stream while compute kernels run on the compute stream.

Run on a machine with 2 (or 4) GPUs:  python -m pytest tests/gpu/test_ckpt_gpu.py -q -s
Tolerances: fp32 (TF32 off) rtol=1e-4, atol=1e-5; bf16 rtol=2e-2, atol=2e-2 (bf16's epsilon is
7.8e-3; the two runs differ only in how gradients are summed, which can flip one rounding).
"""

from __future__ import annotations

import itertools
import json
import os
import tempfile
from typing import Any

import pytest
import torch

from tests.ckpt.models import Config, Layer
from tests.ckpt.test_block_list import _train_equals_plain

pytestmark = [pytest.mark.gpus(2), pytest.mark.world_size(2)]


def _equality() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    for zero_level, ckpt, style in itertools.product((2, 3), (True, False), ("list", "loop")):
        optim_on = "flat" if (zero_level + ckpt) % 2 else "views"
        what = f"zero_level={zero_level} use_checkpoint={ckpt} style={style}"
        try:
            _train_equals_plain(zero_level, ckpt, style, optim_on, dtype=torch.float32, rtol=1e-4, atol=1e-5)
            cfg = Config(dim=64, heads=4, hidden=256, layers=4, seq=32)
            _train_equals_plain(zero_level, ckpt, style, optim_on, cfg=cfg, dtype=torch.bfloat16, rtol=2e-2, atol=2e-2)
        except AssertionError as e:
            raise AssertionError(f"{what}: {e}") from e


def test_training_matches_plain_torch_fp32_and_bf16(spawn):
    spawn(_equality)


@pytest.mark.gpus(4)
@pytest.mark.world_size(4)
def test_training_matches_plain_torch_on_4_gpus(spawn):
    spawn(_equality)


def _big_model(cfg: Config, zero_level: int = 3) -> Any:
    """Built one layer at a time, so no rank ever holds more than one layer unsharded."""
    import bmt_comm
    from bmt_ckpt import Block, TransformerBlockList

    from tests.ckpt.models import distribute_

    device = bmt_comm.get_context().device
    torch.manual_seed(0)
    blocks = [Block(distribute_(Layer(cfg).to(device, torch.bfloat16)), zero_level=zero_level) for _ in range(cfg.layers)]
    return TransformerBlockList(blocks)


def _peak_memory() -> dict[str, float]:
    cfg = Config(dim=1024, heads=16, hidden=4096, layers=24, seq=64)
    model = _big_model(cfg)
    device = torch.device("cuda", torch.cuda.current_device())
    block_bytes = sum(b.layout.total * b.shard.element_size() for b in model[0].storage.buffers)
    x = torch.randn(1, cfg.seq, cfg.dim, device=device, dtype=torch.bfloat16)
    model(x).float().square().mean().backward()  # the shards' gradients now exist
    model.zero_grad()  # as an optimizer over model.parameters() does: the next backward overwrites them
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    y = model(x)
    torch.cuda.synchronize()
    forward = torch.cuda.max_memory_allocated() - base
    torch.cuda.reset_peak_memory_stats()
    y.float().square().mean().backward()
    torch.cuda.synchronize()
    backward = torch.cuda.max_memory_allocated() - base
    r = {"block_MB": block_bytes / 2**20, "model_MB": cfg.layers * block_bytes / 2**20,
         "forward_peak_blocks": forward / block_bytes, "backward_peak_blocks": backward / block_bytes,
         "shards_and_grads_MB": base / 2**20}
    # forward: block i and the prefetched block i+1, plus checkpointed inputs (24 x 128 KiB) and one
    # layer's transient activations. Backward: block i and the prefetched block i-1, block i's full
    # gradient buffer and block i+1's (still read by its in-flight reduce-scatter), and autograd's
    # temporary for the largest parameter's gradient (fc1: 1/3 block) before it lands in the buffer
    assert 1.0 <= r["forward_peak_blocks"] <= 2.3, r
    assert r["backward_peak_blocks"] <= 4.6, r
    return r


def test_peak_memory_is_about_two_blocks(spawn):
    results = spawn(_peak_memory)
    print("\npeak memory above shards+grads, in blocks of full parameters (per rank):", results)


def _overlap() -> dict[str, float]:
    import bmt_comm

    cfg = Config(dim=1024, heads=16, hidden=4096, layers=8, seq=1024)
    model = _big_model(cfg)
    device = bmt_comm.get_context().device
    # GPU-bound, so the CPU queues the next gather while this block's kernels still run: with 16
    # sequences the backward's Python work (recompute, hooks) took about as long as its kernels and
    # some prefetched gathers ran in the gaps between blocks instead of beside compute
    x = torch.randn(64, cfg.seq, cfg.dim, device=device, dtype=torch.bfloat16)
    for _ in range(2):
        model(x).float().square().mean().backward()
    torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(2):
            model(x).float().square().mean().backward()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    kernels = [e for e in events if e.get("cat") == "kernel" and "dur" in e]
    comm = [k for k in kernels if "nccl" in k["name"].lower()]
    compute = [k for k in kernels if "nccl" not in k["name"].lower()]

    def kind(k: dict[str, Any], word: str) -> bool:
        return word in k["name"].lower().replace("_", "")

    gathers = [k for k in comm if kind(k, "allgather")]
    reduces = [k for k in comm if kind(k, "reducescatter")]
    assert gathers and reduces, sorted({k["name"] for k in comm})
    comm_streams = {k["args"]["stream"] for k in gathers + reduces}
    compute_streams = {k["args"]["stream"] for k in compute}
    load = bmt_comm.get_context().streams.load
    assert len(comm_streams) == 1, f"all-gathers and reduce-scatters should all run on the load stream: {comm_streams}"

    def overlapped(k: dict[str, Any]) -> bool:
        return any(
            c["args"]["stream"] != k["args"]["stream"] and c["ts"] < k["ts"] + k["dur"] and k["ts"] < c["ts"] + c["dur"]
            for c in compute
        )

    r = {
        "all_gathers": len(gathers),
        "all_gathers_overlapping_compute": sum(map(overlapped, gathers)) / len(gathers),
        "reduce_scatters": len(reduces),
        "reduce_scatters_overlapping_compute": sum(map(overlapped, reduces)) / len(reduces),
        "load_stream_id": getattr(load, "stream_id", -1),
        "compute_streams": len(compute_streams),
    }
    # per step: 8 forward gathers (7 prefetched), 8 recomputation gathers (7 prefetched), 8
    # reduce-scatters (the last one has no later block to overlap)
    assert r["all_gathers_overlapping_compute"] >= 0.6, r
    assert r["reduce_scatters_overlapping_compute"] >= 0.6, r
    return r


def test_profiler_shows_overlap(spawn):
    results = spawn(_overlap)
    print("\noverlap of NCCL kernels (load stream) with compute kernels (other streams):", results)
