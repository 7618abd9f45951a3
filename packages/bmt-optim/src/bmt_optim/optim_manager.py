"""``OptimManager``: loss scaling, overflow skipping, gradient clipping and schedulers for a set
of optimizers that share one loss scale.

Works in a lone process (no ``init_distributed``) and with any ``torch.optim`` optimizer; with
BMTrain's optimizers (``_bmtrain_optimizer = True``) the scale is handed to ``step(scale=...)``
so the kernel unscales in the same pass.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import warnings
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

import torch
from bmt_comm import ReduceOp, config, current_stream, get_context, is_initialized, print_rank, wait_stream

from .grad_clip import clip_grads_, global_grad_norm, parse_norm_type
from .nan_check import check_inf_nan_many_, new_flag

__all__ = ["LRScheduler", "NonFiniteGradientWarning", "OptimManager"]


class NonFiniteGradientWarning(RuntimeWarning):
    """A step skipped without a loss scale: some rank's gradients held an inf or a nan."""


def _warn_now(skipped: int) -> bool:
    """Warn at the 1st, 10th, 100th, ... skip: once, then rate-limited."""
    return bool(skipped == 10 ** (len(str(skipped)) - 1))


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

    ``skip_nonfinite=True`` (the default) guards the unscaled case too: without a loss scale an
    inf/nan in any gradient (or in a norm ``clip_grad_norm`` computed) on any rank skips the step
    on every rank: parameters, optimizer state and schedulers stay as they were, the gradients
    are zeroed, a ``NonFiniteGradientWarning`` names the step (at the 1st, 10th, 100th... skip)
    and ``skipped_steps`` counts it. ``skip_nonfinite=False`` steps regardless (1.0.1's
    behaviour without a loss scale). With a loss scale the overflow path above is unchanged.
    """

    def __init__(
        self,
        loss_scale: float | None = None,
        loss_scale_factor: float = 2,
        loss_scale_steps: int = 1024,
        min_loss_scale: float = 1,
        max_loss_scale: float = float("inf"),
        grad_scale: int | None = None,
        skip_nonfinite: bool = True,
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
        self.skip_nonfinite = bool(skip_nonfinite)  # off: no check without a loss scale (1.0.1)
        self.step_count = 0  # calls to step(), taken or skipped
        self.skipped_steps = 0  # steps skipped for an inf/nan (overflow or guard), on every rank alike
        # set by clip_grad_norm (a device tensor, no sync) when its norm was inf/nan; read by step()
        self._norm_flag: torch.Tensor | None = None
        self._updated_in_backward = False  # update_during_backward() ran since the last step

    @property
    def _guarded(self) -> bool:
        """The unscaled step checks its gradients (a scaled one always does)."""
        return self.skip_nonfinite and not self.loss_scale_enabled

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

    @contextlib.contextmanager
    def update_during_backward(self) -> Iterator[None]:
        """Opt-in: the backward run inside this context is the last before ``step()``, and each
        gradient is final as soon as its Block's backward is done: an optimizer that can
        (``AdamOffloadOptimizer(overlap=True)``) starts its CPU update of those parameters right
        then, while the backward goes on; ``step()`` updates the rest and waits for all.

        Only for an unguarded, unscaled step (``OptimManager(loss_scale=None,
        skip_nonfinite=False)``): an update that starts before the backward ends cannot be undone
        for an inf/nan found later, and gradients cannot be clipped after it (``clip_grad_norm``
        then raises). With accumulation, run only the last micro-batch's backward inside it.
        """
        if self.loss_scale_enabled or self.skip_nonfinite:
            raise ValueError(
                "update_during_backward() needs OptimManager(loss_scale=None, skip_nonfinite=False): an update "
                "that starts before the backward ends cannot be skipped for an inf/nan found later "
                f"(this manager has loss_scale={self.loss_scale if self.loss_scale_enabled else None}, "
                f"skip_nonfinite={self.skip_nonfinite})"
            )
        armed = [opt for opt in self.optimizers if callable(getattr(opt, "_arm_backward_update", None))]
        if not armed:
            raise ValueError(
                "update_during_backward() needs an optimizer that can update during backward: "
                f"AdamOffloadOptimizer(overlap=True); this manager has {[type(o).__name__ for o in self.optimizers]}"
            )
        for opt in armed:
            opt._arm_backward_update()  # type: ignore[attr-defined]
        self._updated_in_backward = True
        try:
            yield
        finally:
            for opt in armed:
                opt._disarm_backward_update()  # type: ignore[attr-defined]

    def zero_grad(self, set_to_none: bool = False) -> None:
        """Zero gradients in place, as 1.0.1 does (Blocks' gradients are views into flat buffers).

        ``set_to_none=True`` (opt-in) drops them instead, as ``torch.optim`` does by default: the
        gradient memory is free from the end of the step until the next backward needs it (a
        Block's inner parameters let go of their views at its next forward), which lowers the
        peak when the forward's activations, not the backward, set it."""
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)
        self._norm_flag = None

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
        if self._updated_in_backward:
            raise RuntimeError(
                "clip_grad_norm() after update_during_backward(): the update already used the unclipped gradients; "
                "clip only in steps whose backward runs outside update_during_backward()"
            )
        if not max_norm > 0:
            raise ValueError(f"max_norm must be > 0, got {max_norm!r}")
        params = [p for group in param_groups for p in group["params"]]
        norm = global_grad_norm(params, norm_type) / self.loss_scale
        coef = torch.clamp(max_norm / (norm + eps), max=1.0)  # a tensor: no device sync
        if self._guarded:
            # an inf/nan norm would make every gradient nan (or zero, for a norm that overflowed):
            # leave them as they are and make step() skip (the norm is the same on every rank)
            bad = torch.logical_not(torch.isfinite(norm))
            coef = torch.where(bad, torch.ones_like(coef), coef)
            flag = bad.to(torch.int32).reshape(1)
            self._norm_flag = flag if self._norm_flag is None else self._norm_flag.bitwise_or_(flag)
        clip_grads_(params, coef)
        return norm

    # --- the step -----------------------------------------------------------------------
    def _found_overflow(self) -> tuple[bool, bool]:
        """Any inf/nan in any gradient (every dtype) on (any rank, this rank).

        One fused pass per (device, dtype), one all-reduce of one flag over the world, and one
        sync to read it (and this rank's own flag, in the same copy)."""
        grads: dict[torch.device, list[torch.Tensor]] = {}
        for p in self._params():
            g = p.grad
            if g is None:
                continue
            if g.is_sparse:
                g = g.coalesce().values()
            grads.setdefault(g.device, []).append(g)
        comm = get_context().comms.world if is_initialized() else None
        dev = comm.device if comm is not None else next(iter(grads), torch.device("cpu"))
        local = new_flag(dev)
        for d, gs in grads.items():
            local.bitwise_or_(check_inf_nan_many_(gs, new_flag(d)).to(dev))
        if self._norm_flag is not None:
            local.bitwise_or_(self._norm_flag.to(dev))
        flag = local.clone()
        if comm is not None:
            comm.all_reduce(flag, ReduceOp.MAX)
        anywhere, here = torch.cat([flag, local]).tolist()
        return bool(anywhere), bool(here)

    def _justify_scale(self, new_scale: float) -> None:
        old, self.loss_scale = self.loss_scale, new_scale
        if new_scale == old:
            return
        for opt in self.optimizers:
            justify = getattr(opt, "_on_justify_scale", None)
            if justify is not None:
                justify(old, new_scale)

    def step(self) -> bool:
        """Step every optimizer then its scheduler; False if an inf/nan skipped the step."""
        self.step_count += 1
        self._updated_in_backward = False
        for opt in self.optimizers:
            finish = getattr(opt, "finish_update", None)
            if finish is not None:
                finish()  # a delayed update of the last step lands first, even if this step is skipped
        found, here = False, False
        if self.loss_scale_enabled or self._guarded:
            found, here = self._found_overflow()
        self._norm_flag = None
        if found and not self.loss_scale_enabled:
            self._skip_nonfinite(here)
            return False
        if found:
            self.skipped_steps += 1
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

    def _skip_nonfinite(self, here: bool) -> None:
        """The unscaled step met an inf/nan: nothing is updated, the gradients are zeroed."""
        self.skipped_steps += 1
        if _warn_now(self.skipped_steps):
            where = "this rank's gradients" if here else "another rank's gradients"
            warnings.warn(
                f"OptimManager: step {self.step_count} skipped on every rank: an inf or nan in "
                f"{where} (or in a clip_grad_norm norm); parameters, optimizer state and LR "
                f"schedulers are unchanged, the gradients were zeroed. Skipped so far: "
                f"{self.skipped_steps} (see OptimManager.skipped_steps; warned again at 10, 100, ... "
                "skips; OptimManager(skip_nonfinite=False) steps anyway)",
                NonFiniteGradientWarning,
                stacklevel=3,
            )
        self.zero_grad()

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
            "step_count": self.step_count,
            "skipped_steps": self.skipped_steps,
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
        # absent from 1.0.1's state dicts and from ours before the guard: counted from 0
        self.step_count = int(state_dict.get("step_count", 0))
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))
