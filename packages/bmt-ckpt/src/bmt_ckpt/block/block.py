"""``Block`` (also ``CheckpointBlock``): ZeRO-2/3 and activation checkpointing around one module."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

import bmt_comm
import torch
from bmt_comm import Communicator
from bmt_zero import BlockType, DistributedParameter, FlatStorage, mark_in_block, state_dst

from .checkpointing import BlockCall, run_block
from .options import InnerForward, resolve_checkpoint_policy, resolve_compile_options
from .runtime import BlockPhase, BlockRuntime, ReleasePolicy, SharedStorage, link_after
from .scheduler import BlockScheduler
from .state import init_block_parameters, load_block_state, save_block_state

__all__ = ["Block", "BlockMode"]


class BlockMode(str, Enum):
    BLOCK = "BLOCK"  # alone or in a TransformerBlockList: ZeRO over the zero (tp_zero) group
    PIPE = "PIPE"  # inside a PipelineTransformerBlockList: ZeRO over the stage's pp_zero group

    @classmethod
    def parse(cls, mode: BlockMode | str) -> BlockMode:
        try:
            return cls(mode)
        except ValueError:
            raise ValueError(f"mode must be 'BLOCK' or 'PIPE', got {mode!r}") from None


def _check_unfrozen(storage: FlatStorage, what: str) -> None:
    """A parameter frozen when its Block was built lives in a buffer that keeps no gradient;
    unfrozen later it could not train (1.0.1 drops its gradient without a word)."""
    for buf in storage.buffers:
        if buf.layout.key.requires_grad:
            continue
        for slot, p in zip(buf.layout.slots, buf.params, strict=True):
            if p.requires_grad:
                raise RuntimeError(
                    f"parameter '{slot.name}' of Block({what}) had requires_grad=False when the Block was "
                    "built, so its flat storage keeps no gradient; it cannot be unfrozen later. Build the "
                    "Block with it trainable and freeze it afterwards (requires_grad_(False)) instead"
                )


def _comm_chooser(mode: BlockMode) -> Callable[[DistributedParameter], Communicator]:
    comms = bmt_comm.get_context().comms
    if mode is BlockMode.PIPE:
        return lambda p: comms.pp_tp_zero if p.tp_mode else comms.pp_zero
    return lambda p: comms.tp_zero if p.tp_mode else comms.zero


@dataclass
class BuiltBlocks:
    """Per bmt context (``get_context().slot(BuiltBlocks)``): the Blocks that built storage."""

    count: int = 0

    @classmethod
    def next_number(cls) -> int:
        """1, 2, ...: this Block's place among those built since ``init_distributed``, the same
        on every rank that builds the same model (so a rank with fewer layers is caught)."""
        built = bmt_comm.get_context().slot(cls)
        built.count += 1
        return built.count


class Block(torch.nn.Module):
    """ZeRO + activation checkpointing around ``inner_module`` (typically one transformer layer).

    Every parameter of ``inner_module`` must be a DistributedParameter; they move into one flat
    sharded buffer per (dtype, requires_grad, group). Forward gathers them (one all-gather per
    buffer), runs the module (under activation checkpointing with ``use_checkpoint``) and frees
    them (``zero_level=3``) or keeps them until backward (``zero_level=2``). Backward gathers
    again if needed, recomputes, and reduce-scatters (sums) the gradients into the flat shards,
    accumulating until they are zeroed. The inner module is not a registered child: state dict
    keys, ``named_parameters()`` and attribute access are the inner module's own.

    Freezing follows torch, whenever it happens (``p.requires_grad_(False)`` before or after the
    build): with every parameter frozen and no input that requires grad, the Block runs once
    outside autograd (its output needs no grad); a frozen parameter's ``.grad`` is left as it is
    by later backwards. A parameter frozen *at build* has no gradient storage and cannot be
    unfrozen later (an error says so).

    Options beyond 1.0.1 (off by default):

    - ``checkpoint_policy``: selective activation checkpointing while ``use_checkpoint`` is True.
      The forward keeps the outputs of the ops the policy names and backward recomputes the rest,
      through torch's selective checkpointing. Pass ``"matmul_attention"`` (keep matrix products
      and attention, recompute elementwise work), ``"recompute_all"`` (keep nothing: full
      checkpointing whose recomputation stops once backward has what it needs, so the module's
      last ops and their forward hooks do not run again), a collection of ``torch.ops.aten`` OpOverloads,
      or a policy function as ``torch.utils.checkpoint.create_selective_checkpoint_contexts``
      takes. Gradients equal full checkpointing's.
    - ``compile``: run the inner module through ``torch.compile`` (True, or a mapping of its
      keyword arguments), under the Block's gathering, hooks and recomputation; with a
      ``checkpoint_policy`` the policy is compiled in. The inner module itself is not changed.
    """

    _module: torch.nn.Module

    def __init__(
        self,
        inner_module: torch.nn.Module,
        use_checkpoint: bool = True,
        zero_level: int = 3,
        initialized: bool = False,
        mode: BlockMode | str = BlockMode.BLOCK,
        *,
        checkpoint_policy: object = None,
        compile: object = False,
    ) -> None:
        super().__init__()
        if not isinstance(inner_module, torch.nn.Module):
            raise TypeError(f"Block wraps a torch.nn.Module, got {type(inner_module).__name__}")
        for name, sub in inner_module.named_modules():
            if isinstance(sub, Block):
                where = f"'{name}'" if name else "the module itself"
                raise ValueError(f"a Block cannot wrap another Block ({where} is one); wrap the inner modules once")
        for name, p in inner_module.named_parameters():
            if not isinstance(p, DistributedParameter):
                raise ValueError(f"Block parameters must be DistributedParameter; '{name}' is {type(p).__name__}")
        self.__dict__["_module"] = inner_module  # not a child: no key infix in state dicts
        mark_in_block(inner_module)  # its DistributedModules need no first-call work (compiled calls trace through)
        self.use_checkpoint = use_checkpoint
        # what runs inside: the module, compiled and/or under selective checkpointing (opt-in)
        self._inner = InnerForward(
            inner_module, resolve_checkpoint_policy(checkpoint_policy), resolve_compile_options(compile)
        )
        self.zero_level = zero_level
        self._policy = ReleasePolicy.from_zero_level(zero_level)
        self._mode = BlockMode.parse(mode)
        self._in_pipeline = False  # set by PipelineTransformerBlockList: PIPE blocks run only there
        self._runtime: BlockRuntime | None = None
        self.training = inner_module.training
        # the inner module's own tensors show through, so a parent's named_parameters/buffers (which
        # read each module's dicts) list them under the unwrapped model's names
        self.__dict__["_parameters"] = inner_module._parameters
        self.__dict__["_buffers"] = inner_module._buffers
        self.__dict__["_non_persistent_buffers_set"] = inner_module._non_persistent_buffers_set
        if not initialized:
            self.init_param_storage()

    # --- storage -----------------------------------------------------------------------
    def init_param_storage(self) -> None:
        """Move the inner module's parameters into this Block's flat sharded storage."""
        if self._runtime is not None:
            raise RuntimeError("this Block's parameter storage is already built")
        for name, p in self._module.named_parameters():
            if isinstance(p, DistributedParameter) and p.in_block:
                raise ValueError(
                    f"parameter '{name}' already lives in another Block's storage; to share it, build "
                    "Block(module, initialized=True) and call .reference(other_block)"
                )
        named = [(n, p) for n, p in self._module.named_parameters() if isinstance(p, DistributedParameter)]
        comms = bmt_comm.get_context().comms
        number = BuiltBlocks.next_number()
        storage = FlatStorage(
            named,
            _comm_chooser(self._mode),
            agree_over=comms.pp_zero if self._mode is BlockMode.PIPE else comms.zero,
            what=f"Block({type(self._module).__name__})",
            header=[f"Block #{number}: {type(self._module).__name__}"],
        )
        self._runtime = BlockRuntime(SharedStorage(storage), self._policy, BlockScheduler.current())

    def reference(self, block: Block) -> None:
        """Share ``block``'s storage: both wrap the same inner module (e.g. a layer used twice)."""
        if block._module is not self._module:
            raise ValueError("reference() shares storage between Blocks wrapping the same inner module")
        if self._runtime is not None:
            raise RuntimeError("this Block already has its own parameter storage")
        self._runtime = BlockRuntime(block.runtime.shared, self._policy, block.runtime.scheduler)

    @property
    def runtime(self) -> BlockRuntime:
        if self._runtime is None:
            raise RuntimeError(
                "this Block has no parameter storage yet: it was built with initialized=True; "
                "call init_param_storage() or reference(other_block) first"
            )
        return self._runtime

    @property
    def storage(self) -> FlatStorage:
        return self.runtime.storage

    @property
    def mode(self) -> BlockMode:
        return self._mode

    def attach_pipeline(self) -> None:
        """Called by PipelineTransformerBlockList on each of its Blocks: only there may a
        mode='PIPE' Block run (its ZeRO group spans a pipeline stage)."""
        self.require_mode(BlockMode.PIPE, "PipelineTransformerBlockList")
        self._in_pipeline = True

    def require_mode(self, mode: BlockMode, where: str) -> None:
        """Raise if this Block was built for another kind of container than ``where``."""
        if self._mode is not mode:
            raise ValueError(
                f"{where} needs Blocks built with mode='{mode.value}', got one built with "
                f"mode='{self._mode.value}'; rebuild it as Block(module, mode='{mode.value}')"
            )

    # --- neighbours (prefetch order) ---------------------------------------------------
    def set_pre_module(self, pre_module: Block | None) -> None:
        """``pre_module`` runs right before this Block in forward (so right after it in backward):
        each prefetches the other's parameters (the links live in the runtimes)."""
        link_after(self, pre_module)

    def pre_module(self) -> Block | None:
        return self.runtime.pre_block()

    def next_module(self) -> Block | None:
        return self.runtime.next_block()

    def release(self) -> None:
        """Free gathered parameters now (they are gathered again when needed)."""
        self.runtime.shared.release_if_idle()

    # --- running -------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._mode is BlockMode.PIPE and not self._in_pipeline:
            raise RuntimeError(
                "this Block was built with mode='PIPE', which runs only inside a PipelineTransformerBlockList "
                "(that attaches it with attach_pipeline()); build it with mode='BLOCK' to call it alone "
                "or in a TransformerBlockList"
            )
        runtime = self.runtime
        device = bmt_comm.get_context().device
        grad_mode = torch.is_grad_enabled()
        if grad_mode:
            _check_unfrozen(runtime.storage, type(self._module).__name__)
        # the flat shards whose parameters train now: a Block frozen after its build (every
        # parameter requires_grad=False) passes none, so on inputs that need no grad it runs once,
        # outside autograd, as torch does
        flat = [b.shard for b in runtime.storage.buffers if b.trainable]
        inner = self._inner
        selective = self.use_checkpoint and inner.policy is not None
        fn = inner.selective if selective else inner.eager
        recompute = self.use_checkpoint and not selective  # selective: torch recomputes inside the kept graph
        call, tensors = BlockCall.of(runtime, fn, recompute, device, args, kwargs, len(flat))
        if grad_mode and (flat or any(t.requires_grad for t in tensors)):
            return run_block(call, flat, tensors)
        runtime.acquire(BlockPhase.FORWARD)  # no graph: nothing is kept for a backward
        try:
            runtime.bind()
            out = self._inner.eager(*args, **kwargs)
        finally:
            runtime.finish()
        return tuple(out) if isinstance(out, list) else out

    # --- what users and optimizers see -------------------------------------------------
    def grouped_parameters(self) -> Iterator[tuple[str | None, list[torch.nn.Parameter]]]:
        """``(group, [flat shard params])``: the tensors an optimizer should update."""
        yield from self.storage.grouped_parameters()

    def init_parameters(self) -> None:
        """Run each parameter's ``init_method`` on its full tensor (one at a time); keep the shard."""
        init_block_parameters(self._module)
        self.runtime.shared.release_if_idle()  # a kept gather is stale now

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.storage.zero_grad(set_to_none)

    def named_parameters(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, torch.nn.Parameter]]:
        return self._module.named_parameters(prefix, recurse, remove_duplicate)

    def named_buffers(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, torch.Tensor]]:
        return self._module.named_buffers(prefix, recurse, remove_duplicate)

    def named_children(self) -> Iterator[tuple[str, torch.nn.Module]]:
        return self._module.named_children()

    def named_modules(
        self, memo: set[torch.nn.Module] | None = None, prefix: str = "", remove_duplicate: bool = True
    ) -> Iterator[tuple[str, torch.nn.Module]]:
        """This Block (in place of its inner module), then the inner module's descendants."""
        memo = set() if memo is None else memo
        if self in memo:
            return
        if remove_duplicate:
            memo.add(self)
        yield prefix, self
        for name, child in self._module.named_children():
            sub = prefix + ("." if prefix else "") + name
            yield from child.named_modules(memo, sub, remove_duplicate)

    def apply(self, fn: Callable[[torch.nn.Module], None]) -> Block:
        self._module.apply(fn)
        fn(self)
        return self

    def train(self, mode: bool = True) -> Block:
        self.training = mode
        self._module.train(mode)
        return self

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Block:
        """Buffers follow ``fn``; flat storage cannot change dtype or device."""
        for buf in self.storage.buffers:
            probe = fn(torch.empty(0, dtype=buf.layout.key.dtype, device=buf.device))
            if probe.dtype != buf.layout.key.dtype or probe.device != buf.device:
                raise RuntimeError(
                    f"a Block's parameters live in its flat storage ({buf.layout.key.dtype} on {buf.device}) "
                    f"and cannot move to {probe.dtype} on {probe.device}; build the model in that dtype"
                )
        for module in self._module.modules():
            for name, b in module._buffers.items():
                if b is not None:
                    module._buffers[name] = fn(b)
        return self

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = self.__dict__.get("_module")
            if inner is None:
                raise
            return getattr(inner, name)

    def __repr__(self) -> str:
        extra = ""
        if self._inner.policy is not None:
            extra += ", selective checkpointing"
        if self._inner.compile_options is not None:
            extra += ", compiled"
        return f"Block(zero_level={self.zero_level}, use_checkpoint={self.use_checkpoint}{extra}): {self._module!r}"

    # --- state dict ----------------------------------------------------------------------
    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        """Full tensors under the inner module's names. When every rank keeps them (not inside
        ``bmt_zero.gather.gather_to``) and none is tensor-parallel split, the Block is gathered
        once (one all-gather per flat buffer); otherwise each parameter is gathered on its own."""
        bmt_comm.flush_pending_writes()  # a delayed optimizer update in flight lands first
        shared = self.runtime.shared
        tp_size = bmt_comm.get_context().comms.tp.size
        tp_split = any(p.tp_mode and p.tp_split_dim >= 0 for _, p in shared.storage.named_parameters())
        if state_dst() is not None or (tp_split and tp_size > 1) or shared.in_use:
            save_block_state(self._module, destination, prefix, keep_vars)
            return
        storage = shared.storage
        names = {id(p): name for name, p in storage.named_parameters()}
        to_cpu = bmt_comm.get_context().settings.save_param_to_cpu

        def full_of(p: DistributedParameter) -> torch.Tensor:
            view = storage.full_tensor(names[id(p)]).detach()  # valid only until the release below
            return view.to("cpu", copy=True) if to_cpu else view.clone()

        storage.gather_async(force=True)
        storage.wait()
        try:
            save_block_state(self._module, destination, prefix, keep_vars, full_of)
        finally:
            shared.release_if_idle()

    def _load_from_state_dict(
        self,
        state_dict: Mapping[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        bmt_comm.flush_pending_writes()  # a delayed update landing later would overwrite what is loaded
        load_block_state(self._module, state_dict, prefix, strict, missing_keys, unexpected_keys, error_msgs)
        self.runtime.shared.release_if_idle()  # a kept gather is stale now


BlockType.register(Block)  # bmt-zero's init_parameters, grouping and wrappers treat it as a Block
