"""Find libnccl at run time and load it once per process (the binding is in ``_binding``).

Search order, first hit wins:

1. ``BMT_NCCL_LIBRARY`` (a path); when set, nothing else is tried;
2. a ``libnccl.so*`` already mapped into this process (the one torch's CUDA libraries loaded);
3. the ``nvidia-nccl-cu1x`` pip package (``nvidia/nccl/lib/libnccl.so.2``), which torch wheels use;
4. ``torch/lib`` (builds that bundle NCCL);
5. ``ctypes.util.find_library("nccl")`` (a system install).

The loaded library is kept in :class:`bmt_comm.context.ProcessState` (``nccl_library``).
"""

from __future__ import annotations

import ctypes.util
import glob
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from ..context import process_state
from ._binding import NcclLibrary

__all__ = [
    "ENV_VAR",
    "LibrarySource",
    "LibraryCandidate",
    "library_candidates",
    "load_library",
    "get_library",
    "loaded_library",
    "nccl_available",
]

ENV_VAR = "BMT_NCCL_LIBRARY"


class LibrarySource(Enum):
    ENV = ENV_VAR
    LOADED = "already loaded in this process"
    PIP = "nvidia-nccl pip package"
    TORCH = "torch/lib"
    SYSTEM = "ctypes.util.find_library('nccl')"


@dataclass(frozen=True)
class LibraryCandidate:
    source: LibrarySource
    path: str  # a file path, or a bare soname for SYSTEM (the dynamic loader resolves it)


# --- search ------------------------------------------------------------------------------
def _env_path() -> str | None:
    value = os.environ.get(ENV_VAR, "").strip()
    return value or None


def _loaded_paths(maps_file: str = "/proc/self/maps") -> list[str]:
    """libnccl files mapped into this process, in first-mapped order (Linux only)."""
    try:
        with open(maps_file) as f:
            lines = f.readlines()
    except OSError:
        return []
    paths: list[str] = []
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) == 6:
            path = parts[5].strip()
            if os.path.basename(path).startswith("libnccl.so") and path not in paths:
                paths.append(path)
    return paths


def _pip_paths() -> list[str]:
    """``nvidia/nccl/lib/libnccl.so*`` under every ``nvidia`` namespace package directory."""
    try:
        spec = importlib.util.find_spec("nvidia")
    except (ImportError, ValueError):
        return []
    if spec is None or spec.submodule_search_locations is None:
        return []
    paths: list[str] = []
    for root in spec.submodule_search_locations:
        paths.extend(sorted(glob.glob(os.path.join(root, "nccl", "lib", "libnccl.so*"))))
    return paths


def _torch_paths() -> list[str]:
    try:
        spec = importlib.util.find_spec("torch")
    except (ImportError, ValueError):
        return []
    if spec is None or spec.origin is None:
        return []
    return sorted(glob.glob(os.path.join(os.path.dirname(spec.origin), "lib", "libnccl.so*")))


def _system_paths() -> list[str]:
    name = ctypes.util.find_library("nccl")
    return [name] if name else []


def library_candidates() -> list[LibraryCandidate]:
    """Where libnccl will be looked for, in order (``BMT_NCCL_LIBRARY`` alone when set)."""
    env = _env_path()
    if env is not None:
        return [LibraryCandidate(LibrarySource.ENV, env)]
    searches: list[tuple[LibrarySource, Callable[[], list[str]]]] = [
        (LibrarySource.LOADED, _loaded_paths),
        (LibrarySource.PIP, _pip_paths),
        (LibrarySource.TORCH, _torch_paths),
        (LibrarySource.SYSTEM, _system_paths),
    ]
    out: list[LibraryCandidate] = []
    seen: set[str] = set()
    for source, search in searches:
        for path in search():
            if path not in seen:  # the loaded library is usually the pip package's: try it once
                seen.add(path)
                out.append(LibraryCandidate(source, path))
    return out


def load_library() -> NcclLibrary:
    """Open the first loadable candidate; a RuntimeError listing every attempt otherwise."""
    candidates = library_candidates()
    tried: list[str] = []
    for cand in candidates:
        if os.sep in cand.path and not os.path.exists(cand.path):
            tried.append(f"{cand.path} ({cand.source.value}): no such file")
            continue
        try:
            return NcclLibrary(cand.path)
        except (OSError, RuntimeError) as e:
            tried.append(f"{cand.path} ({cand.source.value}): {e}")
    if _env_path() is not None:
        raise RuntimeError(f"{ENV_VAR} names a library that cannot be loaded as NCCL: {'; '.join(tried)}")
    where = "; ".join(tried) if tried else "no candidate found"
    raise RuntimeError(
        "could not load libnccl (searched this process's libraries, the nvidia-nccl pip package, "
        f"torch/lib and the system loader: {where}). Install a CUDA build of torch (it brings "
        f"nvidia-nccl-cu12/cu13), or set {ENV_VAR} to the path of libnccl.so.2"
    )


def get_library() -> NcclLibrary:
    """The process-wide library (loaded on first use)."""
    state = process_state()
    if state.nccl_library is None:
        state.nccl_library = load_library()
    return state.nccl_library


def loaded_library() -> NcclLibrary | None:
    """The library :func:`get_library` returns, or None before its first call."""
    return process_state().nccl_library


def nccl_available() -> bool:
    """Whether libnccl can be loaded here (it says nothing about GPUs)."""
    try:
        get_library()
    except RuntimeError:
        return False
    return True
