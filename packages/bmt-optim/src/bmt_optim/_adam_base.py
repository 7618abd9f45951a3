"""What AdamOptimizer and AdamOffloadOptimizer share: checks, the step loop, state loading.

As in BMTrain 1.0.1, fp32 parameters get torch's own Adam update (L2 weight decay added to the
gradient: bitwise ``torch.optim.Adam``), and fp16/bf16 parameters the fused update of an fp32
master with decoupled weight decay. ``decoupled_weight_decay=True`` (a per-group flag, named as
torch names it) makes the fp32 update ``torch.optim.AdamW``'s, so every dtype decays alike.
Both share one ``hold_steps`` rule: the first ``hold_steps`` calls to ``step`` update the
moments and the step count but use a learning rate of 0 (so no decay either). ``maximize`` is
a per-group flag. Moments are unscaled fp32 whatever the loss scale, so ``_on_justify_scale``
has nothing to do.

What the optimizer sees is what it is given; it never looks inside a model:
- ``AdamOptimizer(model.parameters())`` (the README's and 1.0.1's usage) gets one tensor per
  model parameter: a ``DistributedParameter`` is this rank's 1-D piece of it (inside a Block, a
  view into the Block's flat shard), a plain parameter is whole. The state, and so
  ``state_dict()``, is keyed by those parameters in 1.0.1's order, which a checkpoint of 1.0.1
  needs.
- ``AdamOptimizer(p for _, ps in bmt.grouped_parameters(model) for p in ps)`` gets, for each
  Block, its few big flat shards (one per dtype / requires_grad / group) instead of the
  per-parameter views, and plain parameters as above; fewer, larger updates, but the state is
  keyed by flat buffer, so it only reloads into the same model layout.
Either way, sharded tensors are ``bmt_comm.Shard``s, which is all that ``state_dict(gather=True)``
needs to know.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from itertools import chain
from typing import Any

import torch

from ._offload_state import gather_state, slice_whole
from ._torch_adam import TorchAdamArgs
from .kernels_adam import SUPPORTED_DTYPES, AdamScalars

__all__ = ["AdamBase", "ParamsT", "STATE_TENSORS"]

ParamsT = Iterable[torch.Tensor] | Iterable[dict[str, Any]]
STATE_TENSORS = ("exp_avg", "exp_avg_sq", "_param_fp32")


def _check_number(name: str, value: Any, rule: str, ok: bool) -> None:
    if not ok:
        raise ValueError(f"Adam {name} must be {rule}, got {value!r}")


def check_hyper_params(group: Mapping[str, Any]) -> None:
    """ValueError/TypeError naming the value for any out-of-range hyper-parameter of a group."""
    for key in ("lr", "eps", "weight_decay"):
        v = group[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"Adam {key} must be a real number, got {type(v).__name__} {v!r}")
        _check_number(key, v, "finite and >= 0", math.isfinite(v) and v >= 0)
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Adam betas must be a pair (beta1, beta2), got {betas!r}")
    for i, b in enumerate(betas):
        ok = isinstance(b, (int, float)) and not isinstance(b, bool) and 0.0 <= b < 1.0
        _check_number(f"beta{i + 1}", b, "in [0, 1)", ok)
    for flag in ("maximize", "decoupled_weight_decay"):
        if not isinstance(group.get(flag, False), bool):
            raise TypeError(f"Adam {flag} must be a bool, got {group[flag]!r}")


def check_param(p: torch.Tensor, where: str) -> None:
    if p.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{where}: expected an fp32/fp16/bf16 parameter, got {p.dtype}")


def check_grad(p: torch.Tensor, grad: torch.Tensor, where: str) -> None:
    if grad.is_sparse or grad.layout != torch.strided:
        raise ValueError(f"{where}: Adam does not support sparse gradients (got layout {grad.layout})")
    if grad.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{where}: expected an fp32/fp16/bf16 gradient, got {grad.dtype}")
    if grad.shape != p.shape:
        raise ValueError(f"{where}: gradient shape {tuple(grad.shape)} differs from parameter shape {tuple(p.shape)}")


class AdamBase(torch.optim.Optimizer):
    """torch.optim.Optimizer with BMTrain's ``step(closure=None, scale=1)`` protocol."""

    _bmtrain_optimizer = True  # OptimManager passes the loss scale to step() instead of unscaling grads

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        hold_steps: int = 0,
        *,
        maximize: bool = False,
        decoupled_weight_decay: bool = False,
    ) -> None:
        if isinstance(hold_steps, bool) or not isinstance(hold_steps, int) or hold_steps < 0:
            raise ValueError(f"Adam hold_steps must be an int >= 0, got {hold_steps!r}")
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, maximize=maximize,
            decoupled_weight_decay=decoupled_weight_decay,
        )
        check_hyper_params(defaults)
        self._hold_steps = hold_steps
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            check_hyper_params(group)
            for i, p in enumerate(group["params"]):
                check_param(p, f"{type(self).__name__} param {i} of group {len(self.param_groups) - 1}")
        except (ValueError, TypeError):
            self.param_groups.pop()
            raise

    # ------------------------------------------------------------------ stepping
    def _scalars(self, group: Mapping[str, Any], step: int, scale: float) -> AdamScalars:
        lr = 0.0 if step <= self._hold_steps else float(group["lr"])  # the first hold_steps steps hold
        beta1, beta2 = group["betas"]
        return AdamScalars.make(
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            step=step,
            scale=scale,
            maximize=bool(group.get("maximize", False)),
        )

    def _torch_args(self, group: Mapping[str, Any], step: int, scale: float) -> TorchAdamArgs:
        """The arguments of torch's Adam functional for an fp32 parameter's update ``step``."""
        beta1, beta2 = group["betas"]
        return TorchAdamArgs(
            lr=0.0 if step <= self._hold_steps else float(group["lr"]),  # the same hold rule
            beta1=float(beta1),
            beta2=float(beta2),
            eps=float(group["eps"]),
            weight_decay=float(group["weight_decay"]),
            maximize=bool(group.get("maximize", False)),
            decoupled=bool(group.get("decoupled_weight_decay", False)),
            step=step,
            scale=scale,
        )

    def _params_to_update(self) -> list[tuple[dict[str, Any], torch.Tensor, torch.Tensor]]:
        """(group, param, grad) for each param with a gradient; all checks done before any update."""
        out = []
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                if p.grad is None or not p.requires_grad:
                    continue
                where = f"{type(self).__name__} param {pi} of group {gi}"
                check_param(p, where)
                check_grad(p, p.grad, where)
                out.append((group, p, p.grad))
        return out

    @staticmethod
    def _check_scale(scale: float) -> float:
        scale = float(scale)
        if not (scale > 0 and math.isfinite(scale)):
            raise ValueError(f"loss scale must be a positive finite number, got {scale}")
        return scale

    def _on_justify_scale(self, old_scale: float, new_scale: float) -> None:
        """The loss scale changed: nothing to do, the moments are kept unscaled."""

    def zero_grad(self, set_to_none: bool = False) -> None:
        """Zero the gradients in place by default (Blocks keep views into their gradient buffers)."""
        super().zero_grad(set_to_none=set_to_none)

    # ------------------------------------------------------------------ state
    def _place(self, p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """A new fp32 copy of ``t`` (``p.numel()`` elements) laid out as the state of ``p``."""
        raise NotImplementedError

    def _zeros(self, p: torch.Tensor) -> torch.Tensor:
        """A new fp32 zero tensor laid out as the state of ``p``."""
        raise NotImplementedError

    def _has_master(self, p: torch.Tensor) -> bool:
        """Whether the state of ``p`` keeps an fp32 master copy (``_param_fp32``)."""
        raise NotImplementedError

    def _new_state(self, p: torch.Tensor) -> dict[str, Any]:
        state: dict[str, Any] = {"step": 0, "exp_avg": self._zeros(p), "exp_avg_sq": self._zeros(p)}
        if self._has_master(p):
            state["_param_fp32"] = self._place(p, p.detach())
        return state

    def state_dict(self, gather: bool = False) -> dict[str, Any]:  # type: ignore[override]
        """torch's state dict plus ``"is_whole": gather``.

        ``gather=True`` is collective over the groups of sharded parameters (``bmt_comm.Shard``s:
        ZeRO's parameters and flat tensors, over their ``shard_comm``): rank 0 receives
        each state tensor as the flat 1-D fp32 tensor of the whole parameter on the CPU; the other
        ranks receive an empty ``state``. Such a state dict reloads at any world size.
        """
        sd = super().state_dict()
        sd["is_whole"] = bool(gather)
        if gather:
            params = [p for g in self.param_groups for p in g["params"]]
            sd["state"], _ = gather_state(params, self.state, STATE_TENSORS)
        return sd

    def _load_param_state(
        self, p: torch.Tensor, saved: Mapping[str, Any], index: int, whole: bool
    ) -> dict[str, Any]:
        def get(key: str) -> torch.Tensor:
            t = saved[key]
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"state {key!r} of param {index} must be a tensor, got {type(t).__name__}")
            if whole:
                t = slice_whole(p, t, key, index)
            if t.numel() != p.numel():
                raise ValueError(
                    f"state {key!r} of param {index} has {t.numel()} elements but the parameter has {p.numel()}"
                )
            return self._place(p, t.detach())

        state: dict[str, Any] = {"step": _saved_step(saved, index)}
        state["exp_avg"], state["exp_avg_sq"] = get("exp_avg"), get("exp_avg_sq")
        if self._has_master(p):
            state["_param_fp32"] = get("_param_fp32") if "_param_fp32" in saved else self._place(p, p.detach())
        return state

    def _load_groups(self, state_dict: Mapping[str, Any]) -> dict[int, torch.Tensor]:
        """Check and apply ``param_groups``; the map from saved index to this optimizer's param."""
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"loaded state dict has {len(saved_groups)} parameter groups, this optimizer has {len(self.param_groups)}"
            )
        for i, (g, s) in enumerate(zip(self.param_groups, saved_groups, strict=True)):
            if len(g["params"]) != len(s["params"]):
                raise ValueError(
                    f"group {i} of the loaded state dict has {len(s['params'])} params, this optimizer has {len(g['params'])}"
                )
        id_map = dict(
            zip(
                chain.from_iterable(s["params"] for s in saved_groups),
                chain.from_iterable(g["params"] for g in self.param_groups),
                strict=True,
            )
        )
        new_groups = []
        for g, s in zip(self.param_groups, saved_groups, strict=True):
            ng = {**g, **{k: v for k, v in s.items() if k != "params"}}
            ng["betas"] = tuple(ng["betas"])
            check_hyper_params(ng)
            new_groups.append(ng)
        self.param_groups = new_groups
        return id_map

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a state dict of ``state_dict()``: remaps param indices, copies every tensor as fp32
        onto the state's device, creates ``_param_fp32`` from the parameter when absent. A gathered
        one (``is_whole``) is sliced to this rank's shard of each parameter."""
        whole = bool(state_dict.get("is_whole", False))
        id_map = self._load_groups(state_dict)
        new_state: defaultdict[torch.Tensor, dict[str, Any]] = defaultdict(dict)
        for k, saved in state_dict["state"].items():
            if k not in id_map:
                raise ValueError(f"loaded state names param index {k}, which this optimizer does not have")
            p = id_map[k]
            new_state[p] = self._load_param_state(p, saved, k, whole)
        self.state = new_state


def _saved_step(saved: Mapping[str, Any], index: int) -> int:
    step = saved.get("step")
    if isinstance(step, torch.Tensor):
        step = step.item()
    if isinstance(step, float) and step.is_integer():
        step = int(step)
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"state 'step' of param {index} must be an int >= 0, got {step!r}")
    return step
