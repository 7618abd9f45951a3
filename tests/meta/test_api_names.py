"""Every public name and module path of BMTrain 1.0.1 (reference sections 1-18) imports."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

# module path -> names the reference lists there
API: dict[str, tuple[str, ...]] = {
    "bmtrain": (
        "init_distributed", "config", "rank", "world_size", "DistributedParameter", "ParameterInitializer",
        "DistributedModule", "init_parameters", "grouped_parameters", "synchronize", "sum_loss", "wait_loader",
        "gather_result", "Block", "CheckpointBlock", "TransformerBlockList", "PipelineTransformerBlockList",
        "BMTrainModelWrapper", "save", "load", "print_block", "print_dict", "print_rank", "see_memory",
        "load_nccl_pypi",
        # sub-modules reachable as attributes
        "debug", "loss", "distributed", "nn", "optim", "inspect", "lr_scheduler", "nccl", "utils", "store",
        "global_var",
        # new here: training checkpoints
        "save_checkpoint", "load_checkpoint", "CheckpointInfo", "CheckpointError", "checkpoint",
    ),
    "bmtrain.checkpoint": ("save_checkpoint", "load_checkpoint", "CheckpointInfo", "CheckpointError"),
    "bmtrain.init": ("init_distributed", "is_initialized"),
    "bmtrain.global_var": ("config", "rank", "world_size"),
    "bmtrain.parameter": ("DistributedParameter", "ParameterInitializer"),
    "bmtrain.layer": ("DistributedModule",),
    "bmtrain.block_layer": ("Block", "CheckpointBlock", "TransformerBlockList"),
    "bmtrain.pipe_layer": ("PipelineTransformerBlockList",),
    "bmtrain.wrapper": ("BMTrainModelWrapper", "make_distributed", "model_wrapper_dispatch"),
    "bmtrain.param_init": ("init_parameters", "grouped_parameters", "init_distributed_parameter", "iterate_parameters"),
    "bmtrain.store": (
        "save", "load", "_save_to_rank0", "_save_to_local_rank0", "_save_to_infer_model", "allgather_objects",
        "broadcast_object", "DistributedStateDictWrapper", "DistributedTensorWrapper",
    ),
    "bmtrain.synchronize": ("synchronize", "wait_loader", "sum_loss", "gather_result"),
    "bmtrain.distributed": (
        "all_gather", "all_reduce", "reduce_scatter", "broadcast", "send_activations", "recv_activations",
    ),
    "bmtrain.nccl": (
        "NCCLCommunicator", "getUniqueId", "commInitRank", "commDestroy", "commCount", "commRank", "allReduce",
        "broadcast", "reduce", "allGather", "reduceScatter", "send", "recv", "groupStart", "groupEnd",
        "dtype2nccl", "op2nccl", "ncclInt8", "ncclChar", "ncclBool", "ncclUint8", "ncclInt32", "ncclUint32", "ncclInt64",
        "ncclUint64", "ncclFloat16", "ncclFloat32", "ncclFloat64", "ncclBFloat16", "ncclSum", "ncclProd",
        "ncclMax", "ncclMin", "ncclAvg",
    ),
    "bmtrain.nn": (
        "Linear", "OpLinear", "ColumnParallelLinear", "RowParallelLinear", "VPEmbedding", "OpParallelLinear",
        "ReduceType",
    ),
    "bmtrain.optim": ("AdamOptimizer", "AdamOffloadOptimizer", "OptimManager"),
    "bmtrain.lr_scheduler": ("WarmupLRScheduler", "NoDecay", "Noam", "Linear", "Cosine", "Exponential"),
    "bmtrain.loss": ("FusedCrossEntropy",),
    "bmtrain.inspect": ("inspect_tensor", "record_tensor", "inspect_model", "format_summary"),
    "bmtrain.utils": (
        "print_rank", "print_block", "print_dict", "see_memory", "AverageRecorder", "round_up",
        "tp_split_tensor", "check_torch_version", "load_nccl_pypi", "ALIGN", "ROW_WIDTH",
    ),
    "bmtrain.debug": ("set", "get", "clear", "append", "extend", "DEBUG_VARS"),
    "bmtrain.benchmark": ("all_gather", "reduce_scatter", "send_recv"),
    # 1.0.1's module files, each under its own path
    "bmtrain.benchmark.all_gather": ("all_gather",),
    "bmtrain.benchmark.reduce_scatter": ("reduce_scatter",),
    "bmtrain.benchmark.send_recv": ("send_recv",),
    "bmtrain.benchmark.shape": ("SHAPES",),
    "bmtrain.benchmark.utils": ("format_size", "format_size_"),
    "bmtrain.distributed.ops": (
        "all_gather", "all_reduce", "reduce_scatter", "broadcast", "send_activations", "recv_activations",
    ),
    "bmtrain.inspect.format": ("format_summary",),
    "bmtrain.inspect.model": ("inspect_model",),
    "bmtrain.inspect.tensor": ("inspect_tensor", "record_tensor", "InspectTensor", "InspectTensorManager"),
    "bmtrain.loss._function": (
        "has_inf_nan", "cross_entropy_forward", "cross_entropy_backward_inplace", "fused_sumexp",
        "fused_softmax_inplace",
    ),
    "bmtrain.loss.cross_entropy": ("FusedCrossEntropy", "OpFusedCrossEntropy", "VPFusedCrossEntropy"),
    "bmtrain.lr_scheduler.warmup": ("WarmupLRScheduler",),
    "bmtrain.lr_scheduler.no_decay": ("NoDecay",),
    "bmtrain.lr_scheduler.noam": ("Noam",),
    "bmtrain.lr_scheduler.linear": ("Linear",),
    "bmtrain.lr_scheduler.cosine": ("Cosine",),
    "bmtrain.lr_scheduler.exponential": ("Exponential",),
    "bmtrain.nccl.enums": (
        "ncclInt8", "ncclChar", "ncclBool", "ncclUint8", "ncclInt32", "ncclInt", "ncclUint32", "ncclInt64",
        "ncclUint64", "ncclFloat16", "ncclHalf", "ncclFloat32", "ncclFloat", "ncclFloat64", "ncclDouble",
        "ncclBFloat16", "ncclSum", "ncclProd", "ncclMax", "ncclMin", "ncclAvg",
    ),
    "bmtrain.nn.linear": ("Linear", "OpLinear"),
    "bmtrain.nn.column_parallel_linear": ("ColumnParallelLinear",),
    "bmtrain.nn.row_parallel_linear": ("RowParallelLinear",),
    "bmtrain.nn.parallel_embedding": ("VPEmbedding",),
    "bmtrain.nn.parallel_linear_func": ("OpParallelLinear", "ReduceType"),
    "bmtrain.optim.adam": ("AdamOptimizer",),
    "bmtrain.optim.adam_offload": ("AdamOffloadOptimizer",),
    "bmtrain.optim.optim_manager": ("OptimManager", "check_overflow", "grad_rescale"),
    "bmtrain.optim._function": ("bf16_from_fp32", "fp16_from_fp32"),
    "bmtrain.optim._distributed": ("state_dict_gather",),
}

PAIRS = [(module, name) for module, names in API.items() for name in names]


@pytest.mark.parametrize(("module", "name"), PAIRS, ids=[f"{m}.{n}" for m, n in PAIRS])
def test_name_imports(module: str, name: str) -> None:
    mod = importlib.import_module(module)
    assert hasattr(mod, name), f"{module} has no attribute {name!r}"
    if not name.startswith("_") and hasattr(mod, "__all__"):
        assert name in mod.__all__, f"{name!r} missing from {module}.__all__"


def test_aliases_and_shapes_of_the_api() -> None:
    import bmtrain as bmt
    import bmtrain.block_layer
    import bmtrain.nccl
    import torch

    assert bmt.CheckpointBlock is bmt.Block
    assert bmtrain.block_layer.CheckpointBlock is bmt.Block
    assert callable(bmt.synchronize) and not isinstance(bmt.synchronize, type(bmt))  # the function
    for cls in ("NoDecay", "Noam", "Linear", "Cosine", "Exponential"):
        assert issubclass(getattr(bmt.lr_scheduler, cls), bmt.lr_scheduler.WarmupLRScheduler), cls
    assert issubclass(bmt.DistributedParameter, torch.nn.Parameter)
    assert issubclass(bmt.DistributedModule, torch.nn.Module)
    constants = {"ncclInt8": 0, "ncclChar": 0, "ncclBool": 0, "ncclUint8": 1, "ncclInt32": 2, "ncclUint32": 3,
                 "ncclInt64": 4, "ncclUint64": 5, "ncclFloat16": 6, "ncclFloat32": 7, "ncclFloat64": 8,
                 "ncclBFloat16": 9, "ncclSum": 0, "ncclProd": 1, "ncclMax": 2, "ncclMin": 3, "ncclAvg": 4}
    for name, value in constants.items():
        assert getattr(bmtrain.nccl, name) == value, name


def test_config_before_init() -> None:
    import bmtrain as bmt

    assert dict(bmt.config) == {"rank": 0, "local_rank": 0, "world_size": 1, "initialized": False}
    assert bmt.rank() == 0 and bmt.world_size() == 1


def test_benchmark_is_imported_explicitly() -> None:
    code = "import sys, bmtrain; assert 'bmtrain.benchmark' not in sys.modules; import bmtrain.benchmark"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_check_torch_version_reads_local_and_prerelease_versions(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    from bmtrain.utils import check_torch_version

    monkeypatch.setattr(torch, "__version__", "2.1.0a0+git1234")
    assert check_torch_version("2.1.0") == 0
    assert check_torch_version("1.13.1") == 20100 - 11301
    monkeypatch.setattr(torch, "__version__", "2.4")
    assert check_torch_version("2.3.9") == 20400 - 20309
    with pytest.raises(ValueError, match="version"):
        check_torch_version("two.one")


def test_load_nccl_pypi_uses_the_pip_package_or_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    import bmtrain as bmt

    monkeypatch.delenv("BMT_NCCL_LIBRARY", raising=False)  # restored after the test

    installed = importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.nccl") is not None
    if installed:  # GPU hosts: torch's CUDA wheels bring nvidia-nccl-cu12
        bmt.load_nccl_pypi()
    else:
        with pytest.raises(ImportError, match="nvidia-nccl-cu12"):
            bmt.load_nccl_pypi()
