"""What runs inside a Block: its inner module, optionally compiled (``torch.compile``) and
optionally under selective activation checkpointing (a policy chooses which op outputs the
forward keeps; the rest is recomputed in backward).

Selective checkpointing uses torch's own mechanism (``torch.utils.checkpoint`` with
``create_selective_checkpoint_contexts``) inside the Block's kept graph, so it composes with
``torch.compile``: compiled, the policy marks the graph's nodes and the partitioner honours it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

__all__ = [
    "CheckpointPolicy",
    "PolicyFn",
    "SAVE_MATMUL_AND_ATTENTION",
    "InnerForward",
    "recompute_all",
    "resolve_checkpoint_policy",
    "resolve_compile_options",
]

PolicyFn = Callable[..., "CheckpointPolicy | bool"]

# The preset "matmul_attention" keeps the outputs of matrix products and attention (the costly
# recomputation) and recomputes the elementwise work (norms, activations, rotary, casts).
_PRESET_OPS = (
    "mm.default",
    "addmm.default",
    "bmm.default",
    "baddbmm.default",
    "_scaled_mm.default",
    "_scaled_dot_product_flash_attention.default",
    "_scaled_dot_product_efficient_attention.default",
    "_scaled_dot_product_cudnn_attention.default",
    "_scaled_dot_product_flash_attention_for_cpu.default",
)


def _aten_op(name: str) -> torch._ops.OpOverload | None:
    packet_name, overload = name.split(".")
    packet = getattr(torch.ops.aten, packet_name, None)
    return None if packet is None else getattr(packet, overload, None)


SAVE_MATMUL_AND_ATTENTION: frozenset[torch._ops.OpOverload] = frozenset(
    op for op in map(_aten_op, _PRESET_OPS) if op is not None
)
# The preset "recompute_all" keeps nothing: full checkpointing through torch's non-reentrant
# checkpoint, whose recomputation stops once every tensor the backward needs is back (the inner
# module's last ops, e.g. the final matmul and residual add, are not run again).
_PRESETS: Mapping[str, frozenset[torch._ops.OpOverload]] = {
    "matmul_attention": SAVE_MATMUL_AND_ATTENTION,
    "recompute_all": frozenset(),
}


def _save_ops(ops: frozenset[torch._ops.OpOverload]) -> PolicyFn:
    if not ops:
        return recompute_all

    def policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
        return CheckpointPolicy.MUST_SAVE if op in ops else CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def recompute_all(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    """The policy that keeps nothing; a Block runs it as plain non-reentrant checkpointing (no
    per-op policy calls)."""
    return CheckpointPolicy.PREFER_RECOMPUTE


def resolve_checkpoint_policy(policy: object) -> PolicyFn | None:
    """``checkpoint_policy=`` of a Block: None (full checkpointing), a preset name
    (``"matmul_attention"``, ``"recompute_all"``), a collection of ``torch.ops.aten`` OpOverloads whose outputs are
    kept, or a function ``(ctx, op, *args, **kwargs) -> CheckpointPolicy | bool`` as
    ``torch.utils.checkpoint.create_selective_checkpoint_contexts`` takes."""
    if policy is None:
        return None
    if isinstance(policy, str):
        try:
            return _save_ops(_PRESETS[policy])
        except KeyError:
            raise ValueError(
                f"checkpoint_policy={policy!r} is not a preset; the presets are {sorted(_PRESETS)}, or pass "
                "a collection of torch.ops.aten OpOverloads to keep, or a policy function"
            ) from None
    if isinstance(policy, (Sequence, set, frozenset)):
        ops = list(policy)
        for op in ops:
            if not isinstance(op, torch._ops.OpOverload):
                hint = f" (use {op}.default)" if isinstance(op, torch._ops.OpOverloadPacket) else ""
                raise TypeError(
                    f"checkpoint_policy's ops must be torch OpOverloads such as torch.ops.aten.mm.default, "
                    f"got {op} of type {type(op).__name__}{hint}"
                )
        return _save_ops(frozenset(ops))
    if callable(policy):
        return policy  # type: ignore[no-any-return]
    raise TypeError(
        f"checkpoint_policy must be None, a preset name, a collection of OpOverloads or a function, "
        f"got {type(policy).__name__}"
    )


def resolve_compile_options(compile: object) -> dict[str, Any] | None:
    """``compile=`` of a Block: False (eager), True (``torch.compile`` defaults) or a mapping of
    ``torch.compile`` keyword arguments (e.g. ``{"mode": "max-autotune-no-cudagraphs"}``)."""
    if compile is False or compile is None:
        return None
    if compile is True:
        return {}
    if isinstance(compile, Mapping):
        if not all(isinstance(k, str) for k in compile):
            raise TypeError(f"compile= takes torch.compile's keyword arguments by name, got keys {list(compile)}")
        return dict(compile)
    raise TypeError(f"compile must be a bool or a mapping of torch.compile options, got {type(compile).__name__}")


class InnerForward:
    """The callable a Block runs: ``eager`` (the module, or its compiled form) in any mode, and
    ``selective`` (the module under the policy's checkpointing, compiled with it) for a
    forward whose graph the Block keeps."""

    def __init__(
        self, module: torch.nn.Module, policy: PolicyFn | None, compile_options: dict[str, Any] | None
    ) -> None:
        self.module = module
        self.policy = policy
        self.compile_options = compile_options
        self._eager: Callable[..., Any] | None = None
        self._selective: Callable[..., Any] | None = None

    @property
    def eager(self) -> Callable[..., Any]:
        """The module itself, or (compiled) the module through torch.compile: recomputing it is
        the Block's business (full checkpointing), or nothing is recomputed."""
        if self._eager is None:
            opts = self.compile_options
            self._eager = self.module if opts is None else torch.compile(self.module, **opts)
        return self._eager

    @property
    def selective(self) -> Callable[..., Any]:
        """The module under selective checkpointing (compiled together when asked)."""
        if self.policy is None:
            raise RuntimeError("this Block has no checkpoint_policy; its forward is the inner module's own")
        if self._selective is None:
            module = self.module
            if self.policy is recompute_all:  # keep nothing: plain non-reentrant checkpointing, no per-op policy

                def run(*args: Any, **kwargs: Any) -> Any:
                    return checkpoint(module, *args, use_reentrant=False, **kwargs)

            else:
                context_fn = functools.partial(create_selective_checkpoint_contexts, self.policy)

                def run(*args: Any, **kwargs: Any) -> Any:
                    return checkpoint(module, *args, use_reentrant=False, context_fn=context_fn, **kwargs)

            opts = self.compile_options
            self._selective = run if opts is None else torch.compile(run, **opts)
        return self._selective
