"""Single-file checkpoints, readable by plain ``torch.load``: ``save``, ``load`` and the
state-dict helpers clients call (``_save_to_rank0``)."""

from __future__ import annotations

import functools
import os
from collections import OrderedDict
from collections.abc import Callable, Mapping
from itertools import chain
from typing import Any, BinaryIO, cast

import bmt_comm
import torch
from bmt_comm import Communicator
from torch.nn.modules.module import _IncompatibleKeys

from ..gather import gather_to
from ..model_check import check_model_alike
from . import background
from .atomic import atomic_write
from .checksum import HashingWriter
from .errors import CheckpointError, agree, write_failure
from .report import finish_load
from .verify import check_file, manifest_path, write_manifest
from .view import DistributedStateDictWrapper

__all__ = ["save", "wait_for_save", "load", "load_state_into", "children_everywhere", "_save_to_rank0", "_save_to_local_rank0"]

StateDict = dict[str, Any]
PathLike = str | os.PathLike[str]


def _new_state() -> StateDict:
    state: StateDict = OrderedDict()
    setattr(state, "_metadata", OrderedDict())  # noqa: B010 - torch keeps metadata as an attribute
    return state


def _collect(module: torch.nn.Module, destination: StateDict, prefix: str) -> StateDict:
    """``module.state_dict()``'s walk, except that ``module`` itself is saved through
    ``_save_to_state_dict`` (so a ``state_dict`` override that calls us does not recurse)."""
    local_metadata: dict[str, Any] = {"version": module._version}
    metadata = getattr(destination, "_metadata", None)
    if metadata is not None:
        metadata[prefix[:-1]] = local_metadata
    for pre_hook in module._state_dict_pre_hooks.values():
        pre_hook(module, prefix, False)
    module._save_to_state_dict(destination, prefix, False)
    for name, child in module._modules.items():
        if child is None:
            continue
        if type(child).state_dict is not torch.nn.Module.state_dict:  # e.g. a Block or a client override
            child.state_dict(destination=destination, prefix=prefix + name + ".", keep_vars=False)
        else:
            _collect(child, destination, prefix + name + ".")
    for hook in module._state_dict_hooks.values():
        result = hook(module, destination, prefix, local_metadata)
        if result is not None and not getattr(hook, "_from_public_api", False):
            destination = result
    return destination


def _state_on(model: torch.nn.Module, keep: bool, dst: int | None, destination: StateDict | None,
              prefix: str) -> StateDict:
    scratch = destination if keep and destination is not None else _new_state()
    with gather_to(dst):
        state = _collect(model, scratch, prefix)
    if keep:
        return state
    return destination if destination is not None else _new_state()


def _save_to_rank0(
    model: torch.nn.Module, destination: StateDict | None = None, prefix: str = ""
) -> StateDict:
    """Collective: the full state dict on global rank 0, an empty one elsewhere.

    Parameters are gathered one at a time straight to rank 0; other ranks never hold them whole.
    """
    ctx = bmt_comm.get_context()
    return _state_on(model, ctx.rank == 0, 0, destination, prefix)


def _save_to_local_rank0(
    model: torch.nn.Module, destination: StateDict | None = None, prefix: str = ""
) -> StateDict:
    """Collective: the full state dict on each node's local rank 0, an empty one elsewhere."""
    ctx = bmt_comm.get_context()
    return _state_on(model, ctx.local_rank == 0, None, destination, prefix)


def _to_cpu(state: StateDict, model: torch.nn.Module, own: bool) -> StateDict:
    """Every tensor on CPU (a file loads on any host); with ``own``, none shares memory with the model."""
    shared = {
        t.untyped_storage().data_ptr()
        for t in chain(model.parameters(), model.buffers())
        if t.device.type == "cpu" and t.numel() > 0
    } if own else set()
    out: StateDict = OrderedDict()
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            value = value.detach()
            if value.device.type != "cpu":
                value = value.cpu()
            elif value.numel() > 0 and value.untyped_storage().data_ptr() in shared:
                value = value.clone()  # training goes on while the background thread writes
        out[key] = value
    setattr(out, "_metadata", getattr(state, "_metadata", OrderedDict()))  # noqa: B010
    return out


def _write(state: StateDict, path: str) -> None:
    """``torch.save`` through a counting, hashing file object, then the manifest next to it.

    The previous manifest is removed only once the new file's bytes are on disk, just before the
    rename: a crash in between leaves a file without manifest (loaded unverified), never a file
    with another file's manifest. A failed write raises an ``OSError`` that names the path and
    the cause (``ENOSPC``), whatever torch's writer made of it.
    """
    sink: HashingWriter | None = None

    def write(f: BinaryIO) -> None:
        nonlocal sink
        sink = HashingWriter(f)
        torch.save(state, cast(BinaryIO, sink))
        sink.flush()
        os.fsync(f.fileno())
        try:
            os.unlink(manifest_path(path))
        except FileNotFoundError:
            pass

    try:
        atomic_write(path, write)
    except Exception as ex:
        raise write_failure(path, ex, sink.error if sink else None, sink.size if sink else 0) from ex
    assert sink is not None
    try:
        write_manifest(path, sink.size, sink.crc)
    except Exception as ex:
        failure = write_failure(manifest_path(path), ex, None, 0)
        if not isinstance(failure, OSError) or failure is ex or failure.errno is None:
            raise
        raise OSError(failure.errno, f"{os.strerror(failure.errno)} while writing {manifest_path(path)!r}; "
                      f"{path!r} was written but has no manifest (it loads unverified)") from ex


def _agree(error: BaseException | None, comm: Communicator, what: str) -> None:
    """Rank 0's failure becomes every rank's, the same exception (instead of a hang in the next collective)."""
    agree(error, comm, what)


def _join_background(comm: Communicator) -> None:
    """Wait for rank 0's pending non-blocking save; its failure is raised on every rank."""
    error = background.wait() if comm.rank == 0 else None
    _agree(error, comm, "the previous non-blocking bmt.save")


def wait_for_save() -> None:
    """Collective: wait for rank 0's pending ``save(non_blocking=True)``; if it failed, raise
    its error on every rank (the next ``save`` does the same)."""
    _join_background(bmt_comm.get_context().comms.world)


def save(model: torch.nn.Module, file: PathLike, non_blocking: bool = False) -> None:
    """Collective: write ``model``'s full state dict to ``file`` from rank 0.

    Plain ``torch.load(file)`` reads it back (an OrderedDict with ``_metadata``, every tensor on
    CPU). The write is atomic: a crash leaves the previous file, never a partial one. With
    ``non_blocking`` the file is written by a background thread while training goes on; the next
    ``save``/``load`` and interpreter exit wait for it.
    """
    check_model_alike(model, "bmt.save")  # a rank with another model fails here, alike everywhere
    ctx = bmt_comm.get_context()
    world = ctx.comms.world
    path = os.fspath(file)
    _join_background(world)
    bmt_comm.flush_pending_writes()  # a delayed optimizer update in flight lands before the values are read
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)
    state = _save_to_rank0(model)
    error: BaseException | None = None
    if world.rank == 0:
        try:
            state = _to_cpu(state, model, own=non_blocking)
            if non_blocking:
                background.submit(functools.partial(_write, state, path))
            else:
                _write(state, path)
        except Exception as ex:
            error = ex
    del state
    _agree(error, world, f"bmt.save to {path!r}")
    bmt_comm.synchronize()


def _read(path: str) -> Any:
    """Check ``path`` (size and checksum against its manifest), then read it."""
    check_file(path)
    try:
        try:
            return torch.load(path, map_location="cpu", mmap=True)  # pages come in as tensors are sent
        except RuntimeError as ex:
            if "mmap" not in str(ex):
                raise
            return torch.load(path, map_location="cpu")  # legacy (non-zip) files can't be mapped
    except FileNotFoundError:
        raise
    except Exception as ex:  # a truncated zip gives OSError(EINVAL) or an empty EOFError
        size = os.stat(path).st_size
        raise CheckpointError(
            f"{path} ({size} bytes) can't be read as a torch checkpoint, it is truncated or corrupt: "
            f"{type(ex).__name__}: {ex}"
        ) from ex


def load(model: torch.nn.Module, file: PathLike, strict: bool = True) -> _IncompatibleKeys:
    """Collective: load a full state dict that only rank 0 needs to be able to read.

    Rank 0 reads ``file``; DistributedParameters receive only their piece, ordinary tensors go
    whole to the ranks that hold them, one tensor at a time. A pipeline's layers reach only their
    stage's ranks (``children_everywhere``). Missing/unexpected keys and shape errors are
    reported as ``torch.nn.Module.load_state_dict`` reports them, but before anything is copied.

    The file is checked first (its size and checksum against ``file + ".manifest.json"``, where
    there is one), then its keys and shapes against the model: a failed load raises the same
    :class:`CheckpointError` on every rank and leaves the model as it was.
    """
    check_model_alike(model, "bmt.load")  # a rank with another model fails here, alike everywhere
    bmt_comm.flush_pending_writes()  # a delayed update landing later would overwrite what is loaded
    world = bmt_comm.get_context().comms.world
    _join_background(world)
    state: Any = None
    error: BaseException | None = None
    if world.rank == 0:
        try:
            state = _read(os.fspath(file))
            if not isinstance(state, Mapping):
                raise TypeError(f"{os.fspath(file)!r} holds a {type(state).__name__}, not a state dict")
        except Exception as ex:
            error = ex
    view = DistributedStateDictWrapper(state, world, 0, error)
    del state
    from .precheck import check_against  # it walks the model through children_everywhere, below

    check_against(model, view, strict, world)  # keys and shapes, on every rank, before any copy
    return load_state_into(model, view, strict)


def _restrict(state: Mapping[str, Any], prefix: str) -> Mapping[str, Any]:
    if isinstance(state, DistributedStateDictWrapper):
        return state.restrict(prefix)
    return {k: v for k, v in state.items() if k.startswith(prefix)}


def children_everywhere(module: torch.nn.Module) -> list[str] | None:
    """The names of ``module``'s children on all ranks, if some live on some ranks only.

    Duck-typed protocol (a lower package never imports a higher one): a module whose children are
    spread over ranks (bmt-ckpt's PipelineTransformerBlockList: each stage holds its own layers)
    defines ``_bmt_children_everywhere()``, the same list in the same (load) order on every rank;
    the children held on this rank are those in ``module._modules``. Its ``_load_from_state_dict``
    decides what to report about the keys of the children held elsewhere (they are not
    unexpected: the pipeline reports them as their holders do, so every rank reports alike).
    """
    method = getattr(module, "_bmt_children_everywhere", None)
    if method is None:
        return None
    names = [str(n) for n in method()]
    held = [n for n, c in module._modules.items() if c is not None]
    if len(set(names)) != len(names) or not set(held) <= set(names):
        raise ValueError(
            f"{type(module).__name__}._bmt_children_everywhere() must list every child once, "
            f"got {names} with children {held} held here"
        )
    return names


def load_state_into(model: torch.nn.Module, state: Mapping[str, Any], strict: bool = True) -> _IncompatibleKeys:
    """``model.load_state_dict(state, strict)`` without copying ``state`` first, so a lazy
    ``DistributedStateDictWrapper`` stays lazy; same walk, hooks, errors and result as torch's.

    With a lazy state, the children of a module spread over ranks (``children_everywhere``) are
    loaded one after another on every rank: their holders load them while the others follow.
    """
    bmt_comm.flush_pending_writes()  # a delayed update landing later would overwrite what is loaded
    missing: list[str] = []
    unexpected: list[str] = []
    errors: list[str] = []
    metadata = getattr(state, "_metadata", None)

    def walk(module: torch.nn.Module, local: Mapping[str, Any], prefix: str) -> None:
        local_metadata = {} if metadata is None else metadata.get(prefix[:-1], {})
        module._load_from_state_dict(local, prefix, local_metadata, True, missing, unexpected, errors)
        spread = children_everywhere(module) if isinstance(local, DistributedStateDictWrapper) else None
        if spread is None:
            for name, child in module._modules.items():
                if child is not None:
                    child_prefix = prefix + name + "."
                    walk(child, _restrict(local, child_prefix), child_prefix)
        else:
            assert isinstance(local, DistributedStateDictWrapper)
            for name in spread:
                child_prefix = prefix + name + "."
                sub = local.restrict(child_prefix)
                held = module._modules.get(name)
                if held is None:
                    sub.follow()  # another rank's child: serve (rank 0) or wait while it loads
                else:
                    walk(held, sub, child_prefix)
                    sub.done()
        incompatible = _IncompatibleKeys(missing, unexpected)
        hooks: list[Callable[..., Any]] = list(module._load_state_dict_post_hooks.values())
        for hook in hooks:
            if hook(module, incompatible) is not None:
                raise AssertionError("load_state_dict post hooks must not return a value; edit the keys in place")

    walk(model, state, "")
    return finish_load(model, missing, unexpected, errors, strict)
