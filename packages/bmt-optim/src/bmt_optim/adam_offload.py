"""``AdamOffloadOptimizer``: AdamW whose fp32 master, moments and update live in host memory.

Each step copies the gradients device->host in chunks, runs the C++ CPU Adam (SIMD + threads;
a torch fallback when it is not built) and copies the new parameter values host->device, the
three stages overlapping (see ``_offload_pipeline``). Works on CPU parameters with the same code.

Host state is ordinary (pageable) memory: only the small staging ring is pinned, because only it
is read or written by DMA; pinning 12 bytes per element of state would slow allocation and tie
up locked memory for nothing. As in BMTrain 1.0.1, fp32 parameters get torch's own Adam update
on the host master (L2 decay; ``torch.optim.AdamW``'s with ``decoupled_weight_decay=True``),
fp16/bf16 ones the C++ kernel's decoupled update. Same deliberate differences from 1.0.1 as
``AdamOptimizer`` (one ``hold_steps`` rule, per-group ``maximize``).

``record_delta=True`` records, in the same pass over the state, the mean and variance of the
update direction ``m_hat / (sqrt(v_hat) + eps) + weight_decay * p`` (p before the step; the lr is
not in it; for an fp32 parameter without decoupled decay the L2 term is inside ``m_hat``, so the
direction is the first term only): per parameter in ``state[p]["_delta_info"]`` = float32 ``[mean, var, sum, sum_sq]``,
and over all parameters stepped by the last ``step`` in ``get_avg_delta()``/``get_var_delta()``.
They describe this rank's shards only (no communication), as in BMTrain.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ._adam_base import AdamBase, ParamsT
from ._offload_pipeline import OffloadItem, OffloadPipeline, UpdateScalars
from ._torch_adam import TorchAdamArgs, torch_adam_
from .cpu_adam import CpuAdamBackend, cpu_adam_update, default_num_threads, warn_if_fallback

__all__ = ["DEFAULT_CHUNK_NUMEL", "AdamOffloadOptimizer", "default_offload_threads"]

DEFAULT_CHUNK_NUMEL = 1 << 24  # 16M elements: 32-64 MB per staging buffer; on an H100 host 4M-element chunks left the step 1.3x its CPU stage (per-chunk dispatch), 16M 1.15-1.2x


class AdamOffloadOptimizer(AdamBase):
    """AdamW with host-resident state, for fp32/fp16/bf16 parameters on GPU or CPU.

    State per parameter (host, fp32, flat 1-D): ``exp_avg``, ``exp_avg_sq``, ``_param_fp32``;
    ``step`` (int); with ``record_delta``, ``_delta_info``. Keyword-only tuning: ``chunk_numel`` (elements per pipeline chunk),
    ``num_threads`` (CPU Adam threads; default: ``default_offload_threads()``, this process's
    share of the host's CPUs, less one with CUDA).
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        hold_steps: int = 0,
        record_delta: bool = False,
        *,
        maximize: bool = False,
        decoupled_weight_decay: bool = False,
        chunk_numel: int = DEFAULT_CHUNK_NUMEL,
        num_threads: int | None = None,
    ) -> None:
        super().__init__(
            params, lr, betas, eps, weight_decay, hold_steps, maximize=maximize,
            decoupled_weight_decay=decoupled_weight_decay,
        )
        if not isinstance(record_delta, bool):
            raise TypeError(f"record_delta must be a bool, got {record_delta!r}")
        self.record_delta = record_delta
        self._avg_delta = 0.0
        self._var_delta = 0.0
        if num_threads is not None and num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {num_threads}")
        self._pipeline = OffloadPipeline(chunk_numel)
        self._num_threads = num_threads if num_threads is not None else default_offload_threads()
        self._cpu_backend: CpuAdamBackend | None = None  # None: the C++ kernel when built
        warn_if_fallback()

    def _update(
        self,
        master: torch.Tensor,
        exp_avg: torch.Tensor,
        exp_avg_sq: torch.Tensor,
        grad: torch.Tensor,
        out: torch.Tensor,
        s: UpdateScalars,
        delta: torch.Tensor | None,
    ) -> None:
        if isinstance(s, TorchAdamArgs):
            _torch_update(master, exp_avg, exp_avg_sq, grad, out, s, delta)
            return
        cpu_adam_update(
            master,
            exp_avg,
            exp_avg_sq,
            grad,
            out,
            s,
            num_threads=self._num_threads,
            backend=self._cpu_backend,
            delta=delta,
        )

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, scale: float = 1) -> Any:  # type: ignore[override]
        """One update of every parameter with a gradient; gradients are divided by ``scale``."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        scale = self._check_scale(scale)
        work = self._params_to_update()
        for _, p, grad in work:
            if not p.is_contiguous() or not grad.is_contiguous():
                raise ValueError(
                    f"{type(self).__name__} needs contiguous parameters and gradients "
                    f"(param stride {p.stride()}, grad stride {grad.stride()})"
                )
        items = []
        for group, p, grad in work:
            state = self.state[p]
            if not state:
                state.update(self._new_state(p))
            state["step"] += 1
            items.append(
                OffloadItem(
                    param=p.data.view(-1),
                    grad=grad.view(-1),
                    master=state["_param_fp32"],
                    exp_avg=state["exp_avg"],
                    exp_avg_sq=state["exp_avg_sq"],
                    scalars=(
                        self._torch_args(group, state["step"], scale)
                        if p.dtype == torch.float32
                        else self._scalars(group, state["step"], scale)
                    ),
                    delta=torch.zeros(2, dtype=torch.float64) if self.record_delta else None,
                )
            )
        self._pipeline.run(items, self._update)
        if self.record_delta:
            self._record_delta([(p, it.delta) for (_, p, _), it in zip(work, items, strict=True)])
        return loss

    def _record_delta(self, sums: list[tuple[torch.Tensor, torch.Tensor | None]]) -> None:
        total, total_sq, count = 0.0, 0.0, 0
        for p, d in sums:
            assert d is not None
            s, sq = float(d[0]), float(d[1])
            n = p.numel()
            mean = s / n
            self.state[p]["_delta_info"] = torch.tensor([mean, sq / n - mean * mean, s, sq], dtype=torch.float32)
            total, total_sq, count = total + s, total_sq + sq, count + n
        self._avg_delta = total / count if count else 0.0
        self._var_delta = total_sq / count - self._avg_delta**2 if count else 0.0

    def get_avg_delta(self) -> float:
        """Mean of the update direction over the last step's elements on this rank (0 without
        ``record_delta``)."""
        return self._avg_delta if self.record_delta else 0.0

    def get_var_delta(self) -> float:
        """Variance (E[d^2] - E[d]^2) of the update direction over the last step's elements on this
        rank (0 without ``record_delta``)."""
        return self._var_delta if self.record_delta else 0.0

    def _place(self, p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1).to("cpu", torch.float32, copy=True)

    def _zeros(self, p: torch.Tensor) -> torch.Tensor:
        return torch.zeros(p.numel(), dtype=torch.float32)

    def _has_master(self, p: torch.Tensor) -> bool:
        return True


def _torch_update(
    master: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    grad: torch.Tensor,
    out: torch.Tensor,
    a: TorchAdamArgs,
    delta: torch.Tensor | None,
) -> None:
    """An fp32 chunk: torch's Adam on the host master (the gradient unscaled in its staging buffer,
    as 1.0.1 did), then the new values into ``out`` for the copy back."""
    if a.scale != 1.0:
        grad.mul_(1.0 / a.scale)
    old = master.clone() if delta is not None and a.decoupled and a.weight_decay else None
    torch_adam_([master], [grad], [exp_avg], [exp_avg_sq], [a])
    out.copy_(master)
    if delta is not None:
        inv_bc1, bc2_sqrt = a.bias_corrections()
        d = (exp_avg * inv_bc1).div_(exp_avg_sq.sqrt().div_(bc2_sqrt).add_(a.eps))
        if old is not None:
            d.add_(old, alpha=a.weight_decay)
        d = d.double()
        delta += torch.stack([d.sum(), d.square().sum()])


def default_offload_threads() -> int:
    """This rank's CPUs, less one where GPU copies run: the thread that queues the transfers and
    waits on their events must not queue behind the Adam workers (on a 64-core H100 host, all 64
    cores for Adam left the step 1.3x its CPU stage; 56 to 63 gave 1.1-1.2x)."""
    n = default_num_threads()
    return n - 1 if torch.cuda.is_available() and n > 2 else n
