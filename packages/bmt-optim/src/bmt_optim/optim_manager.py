"""``OptimManager``: loss scaling, overflow skipping, gradient clipping and schedulers for a set
of optimizers that share one loss scale.

Works in a lone process (no ``init_distributed``) and with any ``torch.optim`` optimizer; with
BMTrain's optimizers (``_bmtrain_optimizer = True``) the scale is handed to ``step(scale=...)``
so the kernel unscales in the same pass.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

import torch
from bmt_comm import ReduceOp, config, current_stream, get_context, is_initialized, print_rank, wait_stream

from .grad_clip import clip_grads_, global_grad_norm, parse_norm_type
from .nan_check import check_inf_nan_, new_flag

__all__ = ["LRScheduler", "OptimManager"]


class LRScheduler(Protocol):
    """What the manager needs from a scheduler (BMTrain's, or torch's ``LRScheduler``)."""

    def step(self) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...


def _accepts(fn: Any, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


class OptimManager:
    """Loss scale shared by every added optimizer.

    ``loss_scale=None`` disables scaling (scale 1, no overflow check). With scaling, an inf/nan in
    any gradient on any rank skips the step on every rank, zeroes the gradients and divides the
    scale by ``loss_scale_factor`` (not below ``min_loss_scale``); ``loss_scale_steps`` clean
    steps in a row multiply it by the factor (not above ``max_loss_scale``).
    ``grad_scale`` divides the loss so that gradients summed over ZeRO ranks become means; it
    defaults to ``world_size // pipe_size`` after ``init_distributed`` and to 1 without it.
    """

    def __init__(
        self,
        loss_scale: float | None = None,
        loss_scale_factor: float = 2,
        loss_scale_steps: int = 1024,
        min_loss_scale: float = 1,
        max_loss_scale: float = float("inf"),
        grad_scale: int | None = None,
    ) -> None:
        if not 0 < min_loss_scale <= max_loss_scale:
            raise ValueError(
                f"need 0 < min_loss_scale <= max_loss_scale, got {min_loss_scale!r} and {max_loss_scale!r}"
            )
        if loss_scale is not None and not min_loss_scale <= loss_scale <= max_loss_scale:
            raise ValueError(
                f"loss_scale ({loss_scale!r}) must lie in [min_loss_scale, max_loss_scale] = "
                f"[{min_loss_scale!r}, {max_loss_scale!r}]"
            )
        if not (loss_scale_factor > 0 and loss_scale_factor != 1 and math.isfinite(loss_scale_factor)):
            raise ValueError(f"loss_scale_factor must be a finite number > 0 and != 1, got {loss_scale_factor!r}")
        if loss_scale_steps < 1:
            raise ValueError(f"loss_scale_steps must be >= 1, got {loss_scale_steps!r}")
        if grad_scale is None:
            grad_scale = int(config["zero_size"]) if is_initialized() else 1
        if not grad_scale > 0:
            raise ValueError(f"grad_scale must be > 0, got {grad_scale!r}")

        self.loss_scale_enabled = loss_scale is not None  # off: scale 1 and no overflow check
        self.loss_scale = float(loss_scale) if loss_scale is not None else 1.0
        self.loss_scale_factor = float(loss_scale_factor if loss_scale_factor > 1 else 1 / loss_scale_factor)
        self.loss_scale_steps = int(loss_scale_steps)
        self.min_loss_scale = float(min_loss_scale)
        self.max_loss_scale = float(max_loss_scale)
        self.steps_since_last_scale = 0
        self.grad_scale = grad_scale
        self.optimizers: list[torch.optim.Optimizer] = []
        self.lr_schedulers: list[LRScheduler | None] = []

    def add_optimizer(self, optimizer: torch.optim.Optimizer, lr_scheduler: LRScheduler | None = None) -> None:
        self.optimizers.append(optimizer)
        self.lr_schedulers.append(lr_scheduler)

    def _params(self) -> Iterator[torch.Tensor]:
        for opt in self.optimizers:
            for group in opt.param_groups:
                yield from group["params"]

    # --- forward / backward -------------------------------------------------------------
    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss * loss_scale / grad_scale``."""
        return loss * (self.loss_scale / self.grad_scale)

    def backward(self, loss: torch.Tensor) -> None:
        torch.autograd.backward(self.scale_loss(loss))
        if is_initialized():
            ctx = get_context()
            # the last reduce-scatters of gradients run on the load stream: make them visible
            wait_stream(current_stream(ctx.device), ctx.streams.load)

    def zero_grad(self) -> None:
        """Zero gradients in place (Blocks' gradients are views into flat buffers)."""
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=False)

    # --- clipping -----------------------------------------------------------------------
    def clip_grad_norm(
        self,
        param_groups: Iterable[dict[str, Any]],
        max_norm: float,
        norm_type: float | str = 2,
        eps: float = 1e-6,
    ) -> torch.Tensor:
        """Clip the gradients to ``max_norm`` (unscaled units) and return their unscaled global norm.

        Collective over the world when initialized. The gradients are still multiplied by the
        loss scale here, so the norm is divided by it; the clip factor is
        ``min(1, max_norm / (norm + eps))`` as in ``torch.nn.utils.clip_grad_norm_``.
        """
        parse_norm_type(norm_type)
        if not max_norm > 0:
            raise ValueError(f"max_norm must be > 0, got {max_norm!r}")
        params = [p for group in param_groups for p in group["params"]]
        norm = global_grad_norm(params, norm_type) / self.loss_scale
        coef = torch.clamp(max_norm / (norm + eps), max=1.0)  # a tensor: no device sync
        clip_grads_(params, coef)
        return norm

    # --- the step -----------------------------------------------------------------------
    def _found_overflow(self) -> bool:
        """Any inf/nan in any gradient (every dtype) on any rank; one sync to read the flag."""
        flags: dict[torch.device, torch.Tensor] = {}
        for p in self._params():
            g = p.grad
            if g is None:
                continue
            if g.is_sparse:
                g = g.coalesce().values()
            check_inf_nan_(g, flags.setdefault(g.device, new_flag(g.device)))
        comm = get_context().comms.world if is_initialized() else None
        dev = comm.device if comm is not None else next(iter(flags), torch.device("cpu"))
        flag = new_flag(dev)
        for f in flags.values():
            flag.bitwise_or_(f.to(dev))
        if comm is not None:
            comm.all_reduce(flag, ReduceOp.MAX)
        return bool(flag.item())

    def _justify_scale(self, new_scale: float) -> None:
        old, self.loss_scale = self.loss_scale, new_scale
        if new_scale == old:
            return
        for opt in self.optimizers:
            justify = getattr(opt, "_on_justify_scale", None)
            if justify is not None:
                justify(old, new_scale)

    def step(self) -> bool:
        """Step every optimizer then its scheduler; False if an overflow skipped the step."""
        if self.loss_scale_enabled and self._found_overflow():
            old = self.loss_scale
            new = max(old / self.loss_scale_factor, self.min_loss_scale)
            print_rank(f"Gradient overflow, change scale from {old} to {new}")
            self._justify_scale(new)
            self.steps_since_last_scale = 0
            self.zero_grad()
            return False

        for opt, scheduler in zip(self.optimizers, self.lr_schedulers, strict=True):
            if getattr(opt, "_bmtrain_optimizer", False):
                opt.step(scale=self.loss_scale)  # type: ignore[call-overload]
            else:
                if self.loss_scale_enabled:
                    self._unscale(opt)
                opt.step()
            if scheduler is not None:
                scheduler.step()

        if self.loss_scale_enabled:
            self.steps_since_last_scale += 1
            if self.steps_since_last_scale >= self.loss_scale_steps:
                self.steps_since_last_scale = 0
                if self.loss_scale < self.max_loss_scale:
                    self._justify_scale(min(self.loss_scale * self.loss_scale_factor, self.max_loss_scale))
        if is_initialized():
            ctx = get_context()
            # the next gathers on the load stream must see the updated parameters
            wait_stream(ctx.streams.load, current_stream(ctx.device))
        return True

    def _unscale(self, opt: torch.optim.Optimizer) -> None:
        inv = 1.0 / self.loss_scale
        for group in opt.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.mul_(inv)

    # --- checkpoints --------------------------------------------------------------------
    def state_dict(self, gather_opt: bool = False) -> dict[str, Any]:
        """Optimizer and scheduler states plus the scale. ``gather_opt=True`` asks optimizers
        whose ``state_dict`` takes ``gather`` (the offload Adam) for the whole unsharded state."""
        optimizers = []
        for opt in self.optimizers:
            if gather_opt and _accepts(opt.state_dict, "gather"):
                optimizers.append(opt.state_dict(gather=True))  # type: ignore[call-arg]
            else:
                optimizers.append(opt.state_dict())
        return {
            "optimizers": optimizers,
            "lr_schedulers": [s.state_dict() if s is not None else None for s in self.lr_schedulers],
            "loss_scale": self.loss_scale,
            "loss_scale_enabled": self.loss_scale_enabled,
            "steps_since_last_scale": self.steps_since_last_scale,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        opts, scheds = state_dict["optimizers"], state_dict["lr_schedulers"]
        if len(opts) != len(self.optimizers) or len(scheds) != len(self.lr_schedulers):
            raise ValueError(
                f"state dict holds {len(opts)} optimizers and {len(scheds)} schedulers, this manager "
                f"has {len(self.optimizers)} and {len(self.lr_schedulers)}"
            )
        for i, (sched, sd) in enumerate(zip(self.lr_schedulers, scheds, strict=True)):
            if (sched is None) != (sd is None):
                have = "no scheduler" if sched is None else "a scheduler"
                raise ValueError(f"optimizer {i} has {have} here but the state dict says the opposite")
        for opt, sd in zip(self.optimizers, opts, strict=True):
            opt.load_state_dict(sd)
        for sched, sd in zip(self.lr_schedulers, scheds, strict=True):
            if sched is not None:
                sched.load_state_dict(sd)
        # the loaded optimizer state already matches the saved scale: no _on_justify_scale
        self.loss_scale = float(state_dict["loss_scale"])
        self.loss_scale_enabled = bool(state_dict["loss_scale_enabled"])
        self.steps_since_last_scale = int(state_dict.get("steps_since_last_scale", 0))
