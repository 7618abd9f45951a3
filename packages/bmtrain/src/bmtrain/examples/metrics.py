"""Throughput figures for the progress display and the metrics: parameter count, MFU and peak memory."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist

import bmtrain as bmt

__all__ = ["count_parameters", "count_model_parameters", "peak_bf16_flops", "model_flops_utilization", "peak_memory_gib"]

# dense bf16 tensor-core peak per GPU (no sparsity), by a substring of the device name
_PEAK_BF16 = (("H200", 989e12), ("H100", 989e12), ("A100", 312e12))


def count_parameters(model: torch.nn.Module) -> int:
    """Logical parameter count: the full shape of each sharded parameter, each parameter once.

    Counts what this rank holds: a pipeline stage holds only its own layers (see
    :func:`count_model_parameters` for the whole model)."""
    return _count(model.parameters())


def count_model_parameters(model: torch.nn.Module, device: torch.device) -> int:
    """The whole model's logical parameter count, every pipeline stage's layers included.

    Collective over the world when ``model`` holds a ``PipelineTransformerBlockList``: each
    stage's layer count is summed over all ranks, where ``world / pipe_size`` ranks hold each
    stage (tensor-parallel ranks count full shapes, so they count alike)."""
    pipelines = [m for m in model.modules() if isinstance(m, bmt.PipelineTransformerBlockList)]
    if not pipelines:
        return count_parameters(model)
    staged = {id(p) for m in pipelines for p in m.parameters()}
    outside = _count(p for p in model.parameters() if id(p) not in staged)
    local = torch.tensor(sum(count_parameters(m) for m in pipelines), dtype=torch.int64, device=device)
    dist.all_reduce(local)
    holders: int = bmt.world_size() // int(bmt.config["pipe_size"])  # ranks that hold each stage
    return outside + int(local.item()) // holders


def _count(params: Iterable[torch.nn.Parameter]) -> int:
    total = 0
    for p in params:
        if isinstance(p, bmt.DistributedParameter):
            shape = p.tp_original_shape if p.tp_mode else p.original_shape
            total += shape.numel()
        else:
            total += p.numel()
    return total


def peak_bf16_flops(device: torch.device) -> float | None:
    """The card's bf16 peak in FLOP/s, or None when the device is not a known GPU."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in _PEAK_BF16:
        if key in name:
            return flops
    return None


def model_flops_utilization(n_params: int, tokens_per_s: float, n_gpus: int, peak: float | None) -> float | None:
    """``6 * params * tokens/s`` over the peak of all GPUs (None when the peak is unknown)."""
    if peak is None or n_gpus < 1:
        return None
    return 6.0 * n_params * tokens_per_s / (peak * n_gpus)


def peak_memory_gib(device: torch.device) -> float | None:
    """Peak CUDA memory allocated by this process, in GiB (None on CPU)."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30
