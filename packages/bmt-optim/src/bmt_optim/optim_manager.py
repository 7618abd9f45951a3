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

from ._grad_checks import BackwardChecks
from .grad_clip import clip_grads_, grad_norm_parts, norm_device, parse_norm_type, reduce_norm_parts
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
        self._updated_in_backward = False  # update_during_backward() started updates since the last step
        # update_during_backward() checked the gradients of these optimizers as they arrived
        # (id(optimizer) -> its records); their updates start at step()
        self._checks: dict[int, tuple[torch.optim.Optimizer, BackwardChecks]] = {}
        # id(optimizer) -> the clip factor that its step applies (a device scalar, no sync): after a
        # checked backward, clipping is folded into the update instead of rewriting the gradients
        self._folds: dict[int, torch.Tensor] = {}

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
    def update_during_backward(self, *, defer: bool = False) -> Iterator[None]:
        """Opt-in: the backward run inside this context is the last before ``step()``, and each
        gradient is final as soon as its Block's backward is done. With an optimizer that can
        (``AdamOffloadOptimizer(overlap=True)``) one of two things happens then, while the
        backward goes on through the earlier Blocks:

        - unguarded and unscaled (``OptimManager(loss_scale=None, skip_nonfinite=False)``): the
          CPU update of the Block's parameters starts; ``step()`` updates the rest and waits (or,
          with ``overlap_forward``, returns at once). Such an update cannot be undone for an
          inf/nan found later, nor clipped: ``clip_grad_norm`` then raises.
        - guarded, scaled, or ``defer=True``: the Block's gradients are checked, on the stream that
          copies them to the host, for an inf/nan and for their part of the clipping norm.
          ``step()`` (and ``clip_grad_norm``) read again only what was not checked (parameters
          outside Blocks, gradients changed since), decide for every rank with one all-reduce,
          and then start every update at once from the host copies. ``clip_grad_norm`` leaves
          the gradients as they are and the update applies the factor: in fp32 inside its
          unscale (``grad * factor / loss_scale``), where the default step rounds the clipped
          gradient to its dtype first, so a clipped step equals the default's to that rounding.

        With accumulation, run only the last micro-batch's backward inside it.
        """
        start_now = not (self.loss_scale_enabled or self.skip_nonfinite or defer)
        armed = [opt for opt in self.optimizers if callable(getattr(opt, "_arm_backward_update", None))]
        if not armed:
            raise ValueError(
                "update_during_backward() needs an optimizer that can update during backward: "
                f"AdamOffloadOptimizer(overlap=True); this manager has {[type(o).__name__ for o in self.optimizers]}"
            )
        checks = {}
        for opt in armed:
            # (the scale its step gets when nothing is clipped: speculative updates start at it)
            record = opt._arm_backward_update(not start_now, scale=self.loss_scale)  # type: ignore[attr-defined]
            if record is not None:
                checks[id(opt)] = (opt, record)
        self._checks = checks
        self._updated_in_backward = start_now
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
        self._checks, self._folds = {}, {}

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
        p = parse_norm_type(norm_type)
        if self._updated_in_backward:
            raise RuntimeError(
                "clip_grad_norm() after update_during_backward(): the update already used the unclipped gradients; "
                "clip only in steps whose backward runs outside update_during_backward(), or run it as "
                "update_during_backward(defer=True) (the updates then start at step())"
            )
        if not max_norm > 0:
            raise ValueError(f"max_norm must be > 0, got {max_norm!r}")
        params = [q for group in param_groups for q in group["params"]]
        folded, params = self._split_folded(params)
        norm = self._norm(folded, params, p) / self.loss_scale
        coef = torch.clamp(max_norm / (norm + eps), max=1.0)  # a tensor: no device sync
        if self._guarded:
            # an inf/nan norm would make every gradient nan (or zero, for a norm that overflowed):
            # leave them as they are and make step() skip (the norm is the same on every rank)
            bad = torch.logical_not(torch.isfinite(norm))
            coef = torch.where(bad, torch.ones_like(coef), coef)
            flag = bad.to(torch.int32).reshape(1)
            self._norm_flag = flag if self._norm_flag is None else self._norm_flag.bitwise_or_(flag)
        clip_grads_(params, coef)
        for opt in folded:
            old = self._folds.get(id(opt))
            self._folds[id(opt)] = coef.clone() if old is None else old * coef
        return norm

    def _split_folded(self, params: list[torch.Tensor]) -> tuple[list[torch.optim.Optimizer], list[torch.Tensor]]:
        """(the checked optimizers whose parameters ``params`` covers, the other parameters).

        A checked optimizer's update applies the clip factor to all its parameters, so ``params``
        must hold all of its parameters with a gradient or none."""
        given = {id(q) for q in params}
        folded = []
        for opt, _ in self._checks.values():
            own = [q for group in opt.param_groups for q in group["params"] if q.grad is not None]
            inside = sum(id(q) in given for q in own)
            if inside == 0:
                continue
            if inside != len(own):
                raise ValueError(
                    "clip_grad_norm() after update_during_backward(): the clip is applied inside the update of "
                    f"{type(opt).__name__}, to all its parameters, so it takes all of that optimizer's parameters "
                    f"with a gradient or none (got {inside} of {len(own)}); pass its param_groups"
                )
            folded.append(opt)
        taken = {id(q) for opt in folded for group in opt.param_groups for q in group["params"]}
        return folded, [q for q in params if id(q) not in taken]

    def _norm(self, folded: list[torch.optim.Optimizer], rest: list[torch.Tensor], p: float) -> torch.Tensor:
        """The global p-norm of the gradients of ``rest`` and of ``folded``'s parameters as their
        updates will see them (times any clip factor folded in already): the 2-norm of a checked
        gradient from its record, the others read now."""
        mine = [q for opt in folded for group in opt.param_groups for q in group["params"]]
        dev = norm_device(rest + mine)
        sharded, replicated = grad_norm_parts(rest, p, dev)
        for opt in folded:
            own = [q for group in opt.param_groups for q in group["params"]]
            records, unchecked = self._checks[id(opt)][1].split(own) if p == 2 else ([], own)
            s, r = grad_norm_parts(unchecked, p, dev)
            for record in records:
                _, rs, rr = record.ready(dev)
                s, r = s + rs, r + rr
            fold = self._folds.get(id(opt))
            if fold is not None:  # an earlier clip of this step: the update sees the gradients times it
                f = fold.to(dev)
                s, r = (s * f, r * f) if math.isinf(p) else (s * f**p, r * f**p)
            sharded = torch.maximum(sharded, s) if math.isinf(p) else sharded + s
            replicated = replicated + r
        return reduce_norm_parts(sharded, replicated, p)

    # --- the step -----------------------------------------------------------------------
    def _found_overflow(self) -> tuple[bool, bool, dict[int, float]]:
        """Any inf/nan in any gradient (every dtype) on (any rank, this rank), and the clip factor
        each checked optimizer's update applies.

        One fused pass per (device, dtype) over the gradients no record of a checked backward
        describes, one all-reduce of one flag over the world, and one sync to read it (with this
        rank's own flag and the clip factors, in the same copy)."""
        records = []
        unchecked = {id(p): p for p in self._params()}
        for _, checks in self._checks.values():
            valid, _ = checks.split(list(unchecked.values()))
            records += valid
            for r in valid:
                for p in r.params:
                    del unchecked[id(p)]
        grads: dict[torch.device, list[torch.Tensor]] = {}
        for p in unchecked.values():
            g = p.grad
            if g is None:
                continue
            if g.is_sparse:
                g = g.coalesce().values()
            grads.setdefault(g.device, []).append(g)
        comm = get_context().comms.world if is_initialized() else None
        first = records[0].flag.device if records else torch.device("cpu")
        dev = comm.device if comm is not None else next(iter(grads), first)
        local = new_flag(dev)
        for d, gs in grads.items():
            local.bitwise_or_(check_inf_nan_many_(gs, new_flag(d)).to(dev))
        for r in records:
            local.bitwise_or_(r.ready(dev)[0])
        if self._norm_flag is not None:
            local.bitwise_or_(self._norm_flag.to(dev))
        flag = local.clone()
        if comm is not None:
            comm.all_reduce(flag, ReduceOp.MAX)
        folds = list(self._folds.items())
        values = torch.cat([flag.double(), local.double(), *(f.reshape(1).double().to(dev) for _, f in folds)]).tolist()
        return bool(values[0]), bool(values[1]), {k: v for (k, _), v in zip(folds, values[2:], strict=True)}

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
        found, here, folds = False, False, dict[int, float]()
        if self.loss_scale_enabled or self._guarded or self._folds:
            found, here, folds = self._found_overflow()
        found = found and (self.loss_scale_enabled or self._guarded)
        bad = {k: v for k, v in folds.items() if not (math.isfinite(v) and v > 0)}
        if bad and not found:
            raise RuntimeError(
                f"clip_grad_norm() after update_during_backward(defer=True) gave the clip factor {next(iter(bad.values()))} "
                "(an inf/nan norm) on an unguarded manager: nothing was updated; use OptimManager(skip_nonfinite=True) "
                "to skip such steps"
            )
        self._norm_flag = None
        self._checks, self._folds = {}, {}
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
                # a clip after a checked backward: the update divides by the scale and the factor at once
                opt.step(scale=self.loss_scale / folds.get(id(opt), 1.0))  # type: ignore[call-overload]
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
