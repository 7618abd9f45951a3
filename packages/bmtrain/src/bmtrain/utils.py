"""``bmtrain.utils``: printing helpers, ``AverageRecorder`` and small tools of BMTrain 1.0.1."""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import bmt_comm
import torch
from bmt_comm import printing
from bmt_comm.printing import *  # noqa: F403  # print_rank and friends, listed once there

__all__ = ["tp_split_tensor", "check_torch_version", "load_nccl_pypi", "ALIGN", "ROW_WIDTH"]
__all__ += printing.__all__

ALIGN = 4  # print_dict rounds its key column up to a multiple of this (1.0.1's constant)
ROW_WIDTH = 60  # print_dict/print_block width in characters (1.0.1's constant)

_NCCL_PACKAGES = "nvidia-nccl-cu12 (CUDA 12), nvidia-nccl-cu13 (CUDA 13) or nvidia-nccl-cu11 (CUDA 11)"


def tp_split_tensor(tensor: torch.Tensor, split_dim: int) -> torch.Tensor:
    """This tensor-parallel rank's chunk of ``tensor`` along ``split_dim`` (a contiguous copy)."""
    tp = bmt_comm.get_context().comms.tp
    if not -tensor.dim() <= split_dim < tensor.dim():
        raise ValueError(f"split_dim ({split_dim}) is not a dim of a {tensor.dim()}-d tensor")
    if tensor.shape[split_dim] % tp.size != 0:
        raise ValueError(
            f"tensor dim {split_dim} ({tensor.shape[split_dim]}) must be divisible by tp_size ({tp.size})"
        )
    return tensor.chunk(tp.size, dim=split_dim)[tp.rank].contiguous().clone()


def _version_number(version: str) -> int:
    """``"x.y.z"`` as ``10000x + 100y + z``; pre-release and local parts (``2.1.0a0+git12``) ignored."""
    parts = version.split("+")[0].split(".")
    nums = []
    for part in (parts + ["0", "0"])[:3]:
        m = re.match(r"\d+", part)
        if m is None:
            raise ValueError(f"cannot read a version number from {version!r} (part {part!r})")
        nums.append(int(m.group()))
    return nums[0] * 10000 + nums[1] * 100 + nums[2]


def check_torch_version(version_str: str) -> int:
    """Installed torch minus ``version_str``, both encoded ``10000x + 100y + z`` (>= 0: at least it)."""
    return _version_number(torch.__version__) - _version_number(version_str)


def load_nccl_pypi() -> None:
    """Make bmt's NCCL communicators use the library of the ``nvidia-nccl-cu*`` pip package.

    bmt-comm already looks there when torch brings no NCCL of its own; this pins the choice.
    Call it before the first NCCL use (``init_distributed`` on GPUs). Raises ImportError when no
    such package is installed, RuntimeError when its library is not a usable NCCL or another
    NCCL library is already in use.
    """
    spec = importlib.util.find_spec("nvidia.nccl") if importlib.util.find_spec("nvidia") else None
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"load_nccl_pypi() needs the NCCL pip package: pip install {_NCCL_PACKAGES}")
    libs = sorted(
        lib
        for root in spec.submodule_search_locations
        for lib in (Path(root) / "lib").glob("libnccl.so*")
    )
    if not libs:
        raise ImportError(
            f"the nvidia.nccl package at {list(spec.submodule_search_locations)} has no lib/libnccl.so*; "
            f"reinstall {_NCCL_PACKAGES}"
        )
    from bmt_comm.nccl import NcclLibrary, loaded_library
    from bmt_comm.nccl._search import ENV_VAR

    path = str(libs[0])
    NcclLibrary(path)  # opens it now: a RuntimeError here names what is wrong with it
    loaded = loaded_library()
    if loaded is not None:  # bmt already picked its library
        current = loaded.path
        if os.path.realpath(current) != os.path.realpath(path):
            raise RuntimeError(
                f"bmt already uses the NCCL library {current}; call load_nccl_pypi() before the "
                f"first NCCL use to switch to {path}"
            )
        return
    os.environ[ENV_VAR] = path  # read by bmt-comm's loader on first use
