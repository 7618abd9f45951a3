"""The autograd function that runs a Block: gather, compute, release; in backward gather again,
recompute (activation checkpointing) or reuse the saved graph, and reduce-scatter the gradients.

The Block's inner module runs on detached copies of the tensor inputs, so its graph is separate
from the caller's: backward runs it with ``torch.autograd.backward(..., inputs=...)``, which
accumulates the parameters' full gradients straight into a full gradient buffer (their ``.grad``
are views of it) and gives the inputs' gradients. The flat shard parameters of the buffers
that train (some parameter in them requires grad) are inputs of the function too, so its outputs
require grad even when no tensor input does (e.g. the first layer after a frozen embedding);
their gradients reach ``.grad`` through the reduce-scatter, not through autograd. A Block whose
parameters are all frozen, called on inputs that need no grad, does not come here at all.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._pytree import TreeSpec, tree_flatten, tree_unflatten

from .runtime import BackwardHold, BlockPhase, BlockRuntime, PendingBackward

__all__ = ["BlockCall", "BlockFunction", "RngState", "AutocastState", "run_block"]


@dataclass(frozen=True)
class RngState:
    """CPU and (on GPU) the device's RNG state, so recomputation draws the same dropout masks."""

    cpu: torch.Tensor
    device: torch.device
    cuda: torch.Tensor | None

    @classmethod
    def capture(cls, device: torch.device) -> RngState:
        cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        return cls(torch.get_rng_state(), device, cuda)

    @contextlib.contextmanager
    def restored(self) -> Iterator[None]:
        """Run with this state; the caller's RNG streams are left where they were."""
        devices = [self.device] if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            yield


@dataclass(frozen=True)
class AutocastState:
    """Autocast settings of the forward, re-entered for the recomputation."""

    device_type: str
    enabled: bool
    dtype: torch.dtype
    cpu_enabled: bool
    cpu_dtype: torch.dtype

    @classmethod
    def capture(cls, device: torch.device) -> AutocastState:
        kind = device.type if device.type == "cuda" else "cpu"
        return cls(
            kind,
            torch.is_autocast_enabled(kind),
            torch.get_autocast_dtype(kind),
            torch.is_autocast_enabled("cpu"),
            torch.get_autocast_dtype("cpu"),
        )

    @contextlib.contextmanager
    def restored(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            if self.device_type != "cpu":
                stack.enter_context(torch.autocast(self.device_type, self.dtype, self.enabled))
            stack.enter_context(torch.autocast("cpu", self.cpu_dtype, self.cpu_enabled))
            yield


@dataclass(eq=False)
class BlockCall:
    """One call of a Block: what runs (the inner module, or its compiled or selectively
    checkpointed form), whether the Block recomputes it in backward (full checkpointing) or
    keeps its graph, the non-tensor parts of its arguments, and (filled by the forward) the
    structure of its outputs."""

    runtime: BlockRuntime
    fn: Callable[..., Any]
    recompute: bool
    device: torch.device
    in_spec: TreeSpec
    in_leaves: list[Any]  # tensors replaced by None
    tensor_slots: list[int]  # where the tensors go among the leaves
    n_flat: int  # flat shard parameters passed before the tensor inputs
    out_spec: TreeSpec | None = None
    out_leaves: list[Any] = field(default_factory=list)
    out_slots: list[int] = field(default_factory=list)

    @classmethod
    def of(
        cls, runtime: BlockRuntime, fn: Callable[..., Any], recompute: bool, device: torch.device,
        args: tuple[Any, ...], kwargs: dict[str, Any], n_flat: int,
    ) -> tuple[BlockCall, list[torch.Tensor]]:
        leaves, spec = tree_flatten((args, kwargs))
        slots = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
        tensors: list[torch.Tensor] = [leaves[i] for i in slots]
        kept = [None if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
        return cls(runtime, fn, recompute, device, spec, kept, slots, n_flat), tensors

    def run(self, tensors: tuple[torch.Tensor, ...] | list[torch.Tensor]) -> Any:
        leaves = list(self.in_leaves)
        for slot, t in zip(self.tensor_slots, tensors, strict=True):
            leaves[slot] = t
        args, kwargs = tree_unflatten(leaves, self.in_spec)
        return self.fn(*args, **kwargs)

    def split_output(self, out: Any) -> list[torch.Tensor]:
        """Record the output's structure (a top-level list becomes a tuple); return its tensors."""
        if isinstance(out, list):
            out = tuple(out)
        leaves, self.out_spec = tree_flatten(out)
        self.out_slots = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
        self.out_leaves = [None if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
        return [leaves[i] for i in self.out_slots]

    def join_output(self, tensors: tuple[torch.Tensor, ...] | list[torch.Tensor]) -> Any:
        assert self.out_spec is not None, "join_output before the forward recorded the output"
        leaves = list(self.out_leaves)
        for slot, t in zip(self.out_slots, tensors, strict=True):
            leaves[slot] = t
        return tree_unflatten(leaves, self.out_spec)


def _detached(tensors: tuple[torch.Tensor, ...] | list[torch.Tensor]) -> list[torch.Tensor]:
    """Leaves of the inner graph: same values, same requires_grad (float tensors only)."""
    return [t.detach().requires_grad_(t.requires_grad and (t.is_floating_point() or t.is_complex())) for t in tensors]


class BlockFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, call: BlockCall, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        inputs = tensors[call.n_flat :]
        runtime = call.runtime
        hold = runtime.hold_for_backward()
        ctx.pending = PendingBackward(runtime)
        if call.recompute:
            ctx.rng = RngState.capture(call.device)
            ctx.autocast = AutocastState.capture(call.device)
        runtime.acquire(BlockPhase.FORWARD)
        try:
            runtime.bind()
            if call.recompute:
                with torch.no_grad():
                    outs = call.split_output(call.run(_detached(inputs)))
            else:
                leaves = _detached(inputs)
                with torch.enable_grad():
                    outs = call.split_output(call.run(leaves))
                ctx.inner = (leaves, outs)
        finally:
            runtime.finish()
        ctx.call, ctx.hold = call, hold
        if call.recompute:
            ctx.save_for_backward(*inputs)
        ctx.set_materialize_grads(False)
        results = tuple(t.detach() for t in outs)
        ctx.mark_non_differentiable(*(t for t in results if not (t.is_floating_point() or t.is_complex())))
        return results

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        if torch.is_grad_enabled():
            raise RuntimeError("a Block does not support double backward (backward with create_graph=True)")
        call: BlockCall = ctx.call
        runtime = call.runtime
        runtime.scheduler.queue_final_callback(call.device)
        if not call.recompute and not hasattr(ctx, "inner"):
            raise RuntimeError(
                "a Block that keeps its graph (use_checkpoint=False, or a checkpoint_policy) frees its saved graph after "
                "the first backward; backward through it a second time needs full checkpointing "
                "(use_checkpoint=True without a checkpoint_policy)"
            )
        storage = runtime.storage
        runtime.acquire(BlockPhase.RECOMPUTE if call.recompute else BlockPhase.BACKWARD)
        full_grads = storage.new_full_grads()
        try:
            runtime.bind(full_grads)
            if call.recompute:
                leaves = _detached(ctx.saved_tensors)
                with ctx.rng.restored(), ctx.autocast.restored(), torch.enable_grad():
                    outs = call.split_output(call.run(leaves))
                runtime.advance(BlockPhase.BACKWARD)
            else:
                leaves, outs = ctx.inner
                del ctx.inner
            pairs = [(o, g) for o, g in zip(outs, grads, strict=True) if g is not None and o.requires_grad]
            wrt = [t for t in leaves if t.requires_grad]
            wrt += [p for _, p in storage.named_parameters() if p.requires_grad]
            if pairs and wrt:
                torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs], inputs=wrt)
        finally:
            runtime.finish()
        runtime.scheduler.track_reduce(storage.reduce_scatter_grads(full_grads))
        hold: BackwardHold | None = ctx.hold
        if hold is not None:
            hold.done()
        ctx.pending.done()
        input_grads = [t.grad if t.requires_grad else None for t in leaves]
        return (None,) * (1 + call.n_flat) + tuple(input_grads)


def run_block(call: BlockCall, flat: Sequence[torch.Tensor], tensors: Sequence[torch.Tensor]) -> Any:
    """Run one Block call through autograd (``flat``: the flat shard params that require grad)."""
    outs = BlockFunction.apply(call, *flat, *tensors)  # type: ignore[no-untyped-call]
    return call.join_output(outs)
