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

Hiding the CPU (all opt-in; the default is 1.0.1's step, where everything happens in ``step``):

- ``overlap=True``: gradients leave the GPU during the backward pass. When a Block's gradient is
  final for a backward (the ``bmt_comm`` gradient-ready hook of its flat buffer), this optimizer's
  parameters in it are copied to a host buffer on a side stream while the backward goes on;
  ``step`` then copies only what is stale (parameters outside Blocks, gradients changed in place
  since, e.g. by clipping) and runs the CPU Adam from host memory, each chunk's new values
  going back to the device as soon as they are computed. Numerics are the default's exactly.
  Costs one pinned host copy of the gradients.
- ``overlap=True`` with ``OptimManager.update_during_backward()`` around the last backward before
  the step, on an unscaled, unguarded manager: the CPU Adam of a Block's parameters starts (on a
  background thread) as soon as their gradient is on the host, while the backward goes on;
  ``step`` updates the rest and waits. Exact; such a step cannot be skipped or clipped.
- The same on a guarded or loss-scaled manager (or ``update_during_backward(defer=True)``): each
  Block's gradients are checked as they arrive (``_grad_checks``: an inf/nan flag and their part
  of the clipping 2-norm, on the copy stream), nothing starts during the backward, and ``step``
  (after one all-reduce of the flag) starts every update from the host copies. A clip is applied
  inside the update (its factor joins the scale) instead of rewriting the device gradients.
  Exact without clipping; with it, to the rounding of the clipped gradient (see the manager).
- ``speculative_fraction=f`` (with ``overlap_forward``; after a checked backward): the updates of
  the Blocks whose gradients arrive first, up to ``f`` of the elements, start during the
  backward, out of place (into spare host state), and ``step`` keeps or drops them (see
  ``_speculation``). Exact either way; 14 bytes of host memory per element of ``f``.
- ``overlap_forward=True`` (implies ``overlap``) with ``update_during_backward``: ``step`` waits
  only for the parameters outside Blocks. The Blocks' updates run newest first (the order the
  next forward needs them; after a checked backward they all start at ``step``, in that order)
  and each lands, its copies ordered before the reads by stream events,
  when its Block first reads its parameters (``bmt_comm.wait_param_writes`` from the flat
  buffer's gather), or at the latest at ``finish_update()``, a save or load, a state dict, or the
  next backward's gradient copies. Exact; a direct read of a Block's parameter (not through the
  Block) before then sees its old value. ``cpu_update_seconds`` is set when the last one lands.
- ``delay_update=True`` (implies the gradient streaming): the one-step-delayed update. ``step``
  hands the CPU Adam of step t to a background thread and returns; the forward and backward of
  step t+1 run on the parameters from before it, and the next ``step`` (or ``finish_update()``,
  a checkpoint save or load, a state dict) lands it: the new values, already copied to device
  staging tensors, are copied into the parameters. The gradient of step t+1 is thus taken at
  the parameters of step t-1: **this changes the training numerics** (the update uses a gradient
  one step stale), which is why it is off by default. Costs two pinned host copies of the
  gradients and one device copy of the parameters. An error in the background update is raised
  by the call that lands it; the parameters then keep their old values (the optimizer state of
  that step may be partly updated).

With the C++ kernel, these background updates run on a ``CpuAdamQueue``: its chunks run back to
back on a thread that never holds the GIL, so they do not stall while the main thread runs the
forward and backward; Python threads only wait for each chunk and queue its copy back.

``offload_fraction=f`` (opt-in, default 1: everything offloaded, as 1.0.1) offloads about the
fraction ``f`` of the elements: fp16/bf16 parameters taken in order from the first parameter
group, up to ``1 - f`` of all elements, keep their master and moments on their own device and
are updated there by ``AdamOptimizer``'s fused kernel (for a GPU, milliseconds); the CPU updates
the rest. Those are the first layers, whose gradients come last in backward: with
``update_during_backward`` the CPU never waits for them. It trades device memory (12 bytes per
element kept) for CPU time, for a GPU that has memory to spare. The kernels differ (fused GPU
kernel or the C++ one), so results equal ``f=1``'s to rounding, not bit for bit.
"""

from __future__ import annotations

import concurrent.futures
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import bmt_comm
import torch

from ._adam_base import AdamBase, ParamsT
from ._grad_checks import BackwardChecks
from ._grad_stream import GradStream
from ._host_update import (
    Events,
    HostJob,
    HostResult,
    HostUpdate,
    Landing,
    start_host_update,
    update_from_host,
)
from ._offload_pipeline import OffloadItem, OffloadPipeline, UpdateScalars
from ._speculation import Saved, Spare, SparePool, Speculation, SpeculationStats, keep, undo
from ._torch_adam import TorchAdamArgs, torch_adam_
from .cpu_adam import (
    CpuAdamBackend,
    CpuAdamQueue,
    cpu_adam_update,
    default_num_threads,
    native_available,
    warn_if_fallback,
)
from .kernels_adam import AdamScalars, adam_update

__all__ = ["DEFAULT_CHUNK_NUMEL", "AdamOffloadOptimizer", "default_offload_threads"]

DEFAULT_CHUNK_NUMEL = 1 << 24  # 16M elements: 32-64 MB per staging buffer; on an H100 host 4M-element chunks left the step 1.3x its CPU stage (per-chunk dispatch), 16M 1.15-1.2x


class _Pending(NamedTuple):
    """A delayed update in flight: the background job, and where its values land."""

    future: concurrent.futures.Future[HostResult]
    targets: list[tuple[torch.Tensor, torch.Tensor]]  # (parameter data, its device staging tensor)
    deltas: list[tuple[torch.Tensor, torch.Tensor | None]]  # for record_delta, once it has run


@dataclass
class _LazyStep:
    """The landings of one step still to come (``overlap_forward``)."""

    left: int
    seconds: float  # CPU Adam time of the landings so far
    deltas: list[tuple[torch.Tensor, torch.Tensor | None]]


@dataclass
class _Eager:
    """Updates started during a backward (``OptimManager.update_during_backward``); with
    ``checks``, the backward only checked the gradients and every update starts at the step."""

    groups: dict[int, dict[str, Any]]  # id(param) -> its group
    checks: BackwardChecks | None = None  # a guarded, scaled or clipped step: nothing starts in backward
    scale: float = 1.0  # checked: the scale the manager's step will pass (speculative updates use it)
    # checked with speculative_fraction: updates started before the step's decision, undone if it differs
    speculated: list[Speculation] = field(default_factory=list)
    done: dict[int, torch.Tensor] = field(default_factory=dict)  # id(param) -> param, update started
    futures: list[concurrent.futures.Future[HostResult]] = field(default_factory=list)
    landings: list[Landing] = field(default_factory=list)  # overlap_forward: instead of futures
    deltas: list[tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=list)


class AdamOffloadOptimizer(AdamBase):
    """AdamW with host-resident state, for fp32/fp16/bf16 parameters on GPU or CPU.

    State per parameter (host, fp32, flat 1-D): ``exp_avg``, ``exp_avg_sq``, ``_param_fp32``;
    ``step`` (int); with ``record_delta``, ``_delta_info``. Keyword-only tuning: ``chunk_numel`` (elements per pipeline chunk),
    ``num_threads`` (CPU Adam threads; default: ``default_offload_threads()``, this process's
    share of the host's CPUs, less one with CUDA), ``overlap``, ``delay_update``,
    ``overlap_forward``, ``offload_fraction`` and ``speculative_fraction`` (see the module's
    documentation; ``speculation`` counts the elements speculated). ``cpu_update_seconds``: the time
    spent in the CPU Adam calls of the last update that finished (with ``overlap`` or
    ``delay_update``).
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
        overlap: bool = False,
        delay_update: bool = False,
        offload_fraction: float = 1.0,
        overlap_forward: bool = False,
        speculative_fraction: float = 0.0,
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
        for name, flag in (("overlap", overlap), ("delay_update", delay_update), ("overlap_forward", overlap_forward)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {flag!r}")
        if not (isinstance(offload_fraction, (int, float)) and 0.0 < offload_fraction <= 1.0):
            raise ValueError(
                f"offload_fraction must be in (0, 1], got {offload_fraction!r} (to offload nothing, use AdamOptimizer)"
            )
        if offload_fraction < 1.0 and record_delta:
            raise ValueError("record_delta needs offload_fraction=1: the device kernel does not record the update's statistics")
        self.offload_fraction = float(offload_fraction)
        # id(param) of the parameters updated on their own device (offload_fraction < 1)
        self._on_device = self._choose_on_device(self.offload_fraction)
        if overlap_forward and delay_update:
            raise ValueError(
                "overlap_forward=True and delay_update=True exclude each other: the delayed update already runs "
                "beside the whole next step (choose one)"
            )
        self.overlap = overlap or delay_update or overlap_forward  # gradients stream to the host during backward
        # a step after update_during_backward() returns before the Blocks' new values are in: each
        # Block's first read (its gather) lands its own (exact; ordered by stream events)
        self.overlap_forward = overlap_forward
        if not (isinstance(speculative_fraction, (int, float)) and 0.0 <= speculative_fraction <= 1.0):
            raise ValueError(f"speculative_fraction must be in [0, 1], got {speculative_fraction!r}")
        if speculative_fraction and not overlap_forward:
            raise ValueError(
                f"speculative_fraction={speculative_fraction!r} needs overlap_forward=True: only its updates are copied "
                "to the parameters after the step's decision, so only they can be undone"
            )
        # after a checked backward, up to this fraction of the elements is updated before the
        # step's decision (backed up first, undone if the step differs): the CPU works during the backward
        self.speculative_fraction = float(speculative_fraction)
        self._spares: SparePool | None = None  # made at the first checked backward
        self.speculation = SpeculationStats()
        self.delay_update = delay_update  # step t's update lands at step t+1 (changes numerics)
        self._chunk_numel = chunk_numel
        self._grads = GradStream(sets=2 if delay_update else 1) if self.overlap else None
        if self._grads is not None:
            self._grads.track(self._offloaded())
        self._h2d: dict[torch.device, torch.cuda.Stream] = {}  # why: new values go back while the CPU works on
        self._outs: dict[int, torch.Tensor] = {}  # id(param) -> host output buffer, where grad and param dtypes differ
        self._staging: dict[int, torch.Tensor] = {}  # id(param) -> device copy the delayed update writes
        self._pending: _Pending | None = None
        self._eager: _Eager | None = None  # updates started during this step's backward (update_during_backward)
        # seconds inside the CPU Adam calls of the last update that finished (overlap / delay_update only)
        self.cpu_update_seconds = 0.0
        # why one worker: updates run in the order they were started, one CPU Adam at a time
        self._worker = concurrent.futures.ThreadPoolExecutor(1, "bmt-offload-adam") if self.overlap else None
        # why a second thread: during backward it waits for each gradient's copy and queues the C++
        # chunks, so the queue is fed while the worker waits for earlier chunks and copies them back
        self._feeder = concurrent.futures.ThreadPoolExecutor(1, "bmt-offload-feed") if self.overlap else None
        self._queue: CpuAdamQueue | None = None  # the C++ chunks' own thread (overlap / delay_update), made on first use
        self._priority = 0  # overlap_forward: each started update runs before those started earlier
        self._lazy: dict[int, Landing] = {}  # overlap_forward: id(param) -> its update, not landed yet
        self._lazy_step: _LazyStep | None = None
        self._flush = bmt_comm.register_pending_writes(self.finish_update) if delay_update or overlap_forward else None
        self._param_wait = bmt_comm.register_param_wait(self._land_params) if overlap_forward else None
        if overlap_forward:
            assert self._grads is not None
            self._grads.before_copy = _weak_call(self, AdamOffloadOptimizer._land_all)  # the next backward reuses its memory
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

    def _adam_queue(self) -> CpuAdamQueue | None:
        """The queue the C++ chunks run on (None when torch does the CPU Adam)."""
        if self._cpu_backend is CpuAdamBackend.TORCH or not native_available():
            return None
        if self._queue is None:
            self._queue = CpuAdamQueue(self._num_threads)
        return self._queue

    def _in_background(
        self, feed: Callable[[], HostUpdate], after: dict[torch.device, list[torch.cuda.Event]]
    ) -> concurrent.futures.Future[HostResult]:
        """``feed`` (start an update) on the feeder thread, then its landing on the worker, each in
        the order of the calls."""
        assert self._feeder is not None and self._worker is not None
        fed = self._feeder.submit(feed)
        return self._worker.submit(lambda: fed.result().land(self._update, self._h2d, after))

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, scale: float = 1) -> Any:  # type: ignore[override]
        """One update of every parameter with a gradient; gradients are divided by ``scale``."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        scale = self._check_scale(scale)
        self.finish_update()  # the delayed update of the last step lands before this one starts
        work = self._params_to_update()
        for _, p, grad in work:
            self._check_contiguous(p, grad)
        eager, self._eager = self._eager, None
        if eager is not None and eager.checks is not None:
            eager = None if not self.overlap_forward else eager  # only the order of the Blocks is of use
        elif eager is not None:
            work = self._finish_eager_checks(eager, work, scale)
        landing = self._device_update([w for w in work if id(w[1]) in self._on_device], scale)
        work = [w for w in work if id(w[1]) not in self._on_device]
        kept: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        if eager is not None and eager.speculated:
            work, kept = self._keep_speculation(eager, work, scale)
        items = [self._item(group, p, grad, scale) for group, p, grad in work]
        deltas = [(p, it.delta) for (_, p, _), it in zip(work, items, strict=True)]
        if eager is not None and eager.checks is not None:
            self._step_checked_lazy(eager, work, items, kept + deltas)
            return loss
        if eager is not None:
            self._step_after_eager(eager, work, items, deltas)
            return loss
        if self._grads is None:
            self._pipeline.run(items, self._update)
        else:
            self._step_from_host(work, items, deltas, landing)
            return loss
        if self.record_delta:
            self._record_delta(deltas)
        return loss

    # --- offload_fraction: the part updated on the parameters' own device -----------------------
    def _choose_on_device(self, fraction: float) -> set[int]:
        """fp16/bf16 parameters in order, up to ``1 - fraction`` of all elements."""
        if fraction >= 1.0:
            return set()
        params = [p for g in self.param_groups for p in g["params"]]
        budget = (1.0 - fraction) * sum(p.numel() for p in params)
        chosen: set[int] = set()
        used = 0
        for p in params:
            if p.dtype in (torch.float16, torch.bfloat16) and used + p.numel() <= budget:
                chosen.add(id(p))
                used += p.numel()
        return chosen

    def _offloaded(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"] if id(p) not in self._on_device]

    def _staging_for(self, p: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        staging = self._staging.get(id(p))
        if staging is None or staging.shape != target.shape or staging.dtype != target.dtype:
            staging = self._staging[id(p)] = torch.empty_like(target)
        return staging

    def _device_update(
        self, work: list[tuple[dict[str, Any], torch.Tensor, torch.Tensor]], scale: float
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The fused kernel on the parameters kept on their device (queued on the current stream);
        delayed, into staging tensors: returns the (parameter, staging) pairs to land."""
        landing = []
        for group, p, grad in work:
            it = self._item(group, p, grad, scale)
            target = it.param
            if self.delay_update:
                staging = self._staging_for(p, target)
                landing.append((target, staging))
                target = staging
            assert isinstance(it.scalars, AdamScalars)
            adam_update(target, grad.reshape(-1), it.master, it.exp_avg, it.exp_avg_sq, it.scalars)
        return landing

    def _check_contiguous(self, p: torch.Tensor, grad: torch.Tensor) -> None:
        if not p.is_contiguous() or not grad.is_contiguous():
            raise ValueError(
                f"{type(self).__name__} needs contiguous parameters and gradients "
                f"(param stride {p.stride()}, grad stride {grad.stride()})"
            )

    def _item(self, group: dict[str, Any], p: torch.Tensor, grad: torch.Tensor, scale: float) -> OffloadItem:
        """Count the step of ``p`` and describe its update."""
        state = self.state[p]
        if not state:
            state.update(self._new_state(p))
        state["step"] += 1
        return OffloadItem(
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

    # --- update during backward (OptimManager.update_during_backward) ------------------------
    def _arm_backward_update(self, check: bool = False, scale: float = 1.0) -> BackwardChecks | None:
        """Until ``_disarm_backward_update``, each gradient that this optimizer's copies bring to
        the host is final: its update starts at once, on the background thread. ``check``: instead,
        each is checked as it arrives (returned: the records, for the manager) and every update
        starts at the step, which the checks let go ahead (``_step_checked_lazy``); with
        ``speculative_fraction``, some start at once, at ``scale`` (the step's if nothing is
        clipped), and are undone if the step differs."""
        if self._grads is None or self.delay_update:
            raise ValueError(
                "update_during_backward() needs AdamOffloadOptimizer(overlap=True) without delay_update "
                f"(this one has overlap={self.overlap}, delay_update={self.delay_update})"
            )
        if self._eager is not None and self._eager.checks is None:
            raise RuntimeError(
                "update_during_backward(): an update already started during an earlier backward since the last "
                "step(); only the last micro-batch's backward may run inside update_during_backward()"
            )
        self._undo_speculation()  # a checked backward again before the step: it starts over
        groups = {id(p): g for g in self.param_groups for p in g["params"]}
        if check:
            checks = BackwardChecks(self._grads.is_current)
            self._eager = _Eager(groups, checks, self._check_scale(scale))
            self._grads.measure = checks.measure
            if self.speculative_fraction and self._adam_queue() is not None:
                if self._spares is None:
                    total = sum(p.numel() for p in self._offloaded())
                    pin = any(p.device.type == "cuda" for p in self._offloaded())
                    self._spares = SparePool(int(self.speculative_fraction * total), pin)
                self._grads.on_copied = self._speculate
            return checks
        self._eager = _Eager(groups)
        self._grads.on_copied = self._update_in_backward
        return None

    def _disarm_backward_update(self) -> None:
        if self._grads is not None:
            self._grads.on_copied = None
            self._grads.measure = None

    def _update_in_backward(self, indices: list[int], produced_on: torch.cuda.Stream | None) -> None:
        eager, grads = self._eager, self._grads
        assert eager is not None and grads is not None
        ready = []
        for i in indices:
            p = grads.param(i)
            group = eager.groups.get(id(p))
            if group is None or p.grad is None or not p.requires_grad:
                continue
            if id(p) in eager.done:
                raise RuntimeError(
                    f"update_during_backward(): the gradient of a parameter of shape {tuple(p.shape)} became final "
                    "twice in one backward (a Block run twice in the forward?) after its update had started; run "
                    "this backward outside update_during_backward()"
                )
            grad = p.grad
            self._check_contiguous(p, grad)
            item = self._item(group, p, grad, 1.0)
            eager.done[id(p)] = p
            eager.deltas.append((p, item.delta))
            ready.append((i, item))
        if ready:
            self._start_from_copies(eager, ready, produced_on)

    def _start_from_copies(
        self,
        eager: _Eager,
        ready: list[tuple[int, OffloadItem]],
        produced_on: torch.cuda.Stream | None,
        spares: list[tuple[Spare, torch.Tensor]] | None = None,
    ) -> Landing | None:
        """Start the update of parameters whose gradients' copies are queued (``ready``: their
        indices in the gradient stream, and their items), behind the updates started before
        (``spares``: out of place, into each one's spare state and output buffer; by default in
        place, the new values over the host gradients where the dtypes agree). Returns its
        landing (``overlap_forward``)."""
        grads = self._grads
        assert grads is not None
        jobs, copies, started = [], [], []
        for k, (i, item) in enumerate(ready):
            p = grads.param(i)
            host, event = grads.copied(i)
            into = None
            if spares is not None:
                into, out = spares[k]
            else:
                out = host if host.dtype == p.dtype else self._out_buffer(p)
            jobs.append(HostJob(item._replace(grad=host), host, out, item.param, into))  # no reference to the device gradient
            copies.append(event)
            started.append(p)
        after = self._queued_readers([job.target for job in jobs], produced_on)
        landed = {e for e in copies if e is not None}
        queue = self._adam_queue()
        self._priority += 1
        priority = self._priority if self.overlap_forward else 0  # newest first: the next forward's order

        def feed() -> HostUpdate:
            for e in landed:
                e.synchronize()  # the gradient is on the host
            return start_host_update(jobs, self._chunk_numel, queue, priority)

        if self.overlap_forward:
            assert self._feeder is not None
            landing = Landing(self._feeder.submit(feed), after, started)
            eager.landings.append(landing)
            return landing
        eager.futures.append(self._in_background(feed, after))
        return None

    # --- speculative_fraction: updates started before the step's decision ----------------------
    def _speculate(self, indices: list[int], produced_on: torch.cuda.Stream | None) -> None:
        """A checked backward's gradient-ready hook (after the checks and copies are queued):
        start the update of these parameters now if the backup has room for their state."""
        eager, grads, pool = self._eager, self._grads, self._spares
        assert eager is not None and grads is not None and pool is not None
        saved: list[Saved] = []
        ready, spares = [], []
        for i in indices:
            p = grads.param(i)
            group, grad = eager.groups.get(id(p)), p.grad
            if (
                group is None
                or grad is None
                or not p.requires_grad
                or p.dtype not in (torch.float16, torch.bfloat16)  # fp32: torch's Adam, run only at landing
                or not (p.is_contiguous() and grad.is_contiguous())  # the step raises for it
                or id(p) in self._on_device
            ):
                continue
            taken = pool.take(p)
            if taken is None:
                continue
            state = self.state[p]
            new, before = not state, int(state.get("step", 0))
            item = self._item(group, p, grad, eager.scale)
            assert isinstance(item.scalars, AdamScalars)
            saved.append(Saved(p, before, new, taken[0], item.scalars, item.delta))
            ready.append((i, item))
            spares.append(taken)
        if not ready:
            return
        landing = self._start_from_copies(eager, ready, produced_on, spares)
        assert landing is not None
        eager.speculated.append(Speculation(landing, saved))
        self.speculation.started += sum(s.param.numel() for s in saved)

    def _keep_speculation(
        self, eager: _Eager, work: list[tuple[dict[str, Any], torch.Tensor, torch.Tensor]], scale: float
    ) -> tuple[list[tuple[dict[str, Any], torch.Tensor, torch.Tensor]], list[tuple[torch.Tensor, torch.Tensor | None]]]:
        """At the step: keep the speculative updates that used what this step uses, undo the others.
        Returns the work left (without the kept ones) and the kept ones' record_delta sums."""
        grads = self._grads
        assert grads is not None
        groups = {id(p): g for g, p, _ in work}
        kept: list[Speculation] = []
        dropped: list[Speculation] = []
        for spec in eager.speculated:
            same = all(
                id(s.param) in groups
                and grads.is_current(s.param)
                and self._scalars(groups[id(s.param)], s.step + 1, scale) == s.scalars
                for s in spec.saved
            )
            (kept if same else dropped).append(spec)
        eager.speculated = dropped
        self._undo_speculation(eager)  # (no longer self._eager: the step took it)
        assert self._spares is not None
        for spec in kept:
            keep(spec, self.state, self._spares)
        done = {id(s.param) for spec in kept for s in spec.saved}
        self.speculation.kept += sum(s.param.numel() for spec in kept for s in spec.saved)
        return [w for w in work if id(w[1]) not in done], [(s.param, s.delta) for spec in kept for s in spec.saved]

    def _undo_speculation(self, eager: _Eager | None = None) -> None:
        """Drop every speculative update of ``eager`` (default: the current checked backward's):
        wait for its chunks and take back its step count; the state it read is untouched, and its
        host gradient is as it was copied."""
        eager = eager or self._eager
        if eager is None or not eager.speculated:
            return
        specs, eager.speculated = eager.speculated, []
        error: BaseException | None = None
        for spec in specs:
            eager.landings.remove(spec.landing)
            try:
                spec.landing.fed.result().settle()
            except BaseException as e:  # noqa: BLE001 - the feed failed (start_host_update settled its chunks); raised below
                error = error or e
            undo(spec, self.state)
            self.speculation.undone += sum(s.param.numel() for s in spec.saved)
        if error is not None:
            raise error

    def _step_checked_lazy(
        self,
        eager: _Eager,
        work: list[tuple[dict[str, Any], torch.Tensor, torch.Tensor]],
        items: list[OffloadItem],
        deltas: list[tuple[torch.Tensor, torch.Tensor | None]],
    ) -> None:
        """``overlap_forward`` after a checked backward: the Blocks' updates start now, one per
        Block in the order their gradients arrived (so the last to arrive, the first Block the
        next forward reads, runs first), from the host copies still current; the rest (parameters
        outside Blocks, gradients changed since) is updated first and waited for."""
        grads, checks = self._grads, eager.checks
        assert grads is not None and checks is not None
        grads.track(self._offloaded())
        position = {id(p): k for k, (_, p, _) in enumerate(work)}
        started: set[int] = set()
        for record in checks.records:
            ready = []
            for p in record.params:
                k = position.get(id(p))
                if k is not None and k not in started and grads.is_current(p):
                    ready.append((grads.index(p), items[k]))
                    started.add(k)
            if ready:
                self._start_from_copies(eager, ready, None)
        rest = [k for k in range(len(work)) if k not in started]
        jobs = self._jobs_from_host([work[k][1] for k in rest], [items[k] for k in rest])
        after = self._queued_readers([job.target for job in jobs])
        self._land_rest_only(eager, jobs, after, self._adam_queue(), deltas)

    def _jobs_from_host(self, params: list[torch.Tensor], items: list[OffloadItem]) -> list[HostJob]:
        """Jobs that update ``params`` (their ``items``) from their host gradients, copying the stale ones."""
        grads = self._grads
        assert grads is not None
        return [
            HostJob(it._replace(grad=host), host, host if host.dtype == p.dtype else self._out_buffer(p), it.param)
            for p, it, host in zip(params, items, grads.collect(params), strict=True)
        ]

    def _queued_readers(
        self, targets: list[torch.Tensor], also: torch.cuda.Stream | None = None
    ) -> dict[torch.device, list[torch.cuda.Event]]:
        """Events after the work queued so far that may read ``targets`` (on the current stream and
        on ``also``): their host->device copies wait for them."""
        after: dict[torch.device, list[torch.cuda.Event]] = {}
        for t in targets:
            if t.device.type != "cuda" or t.device in after:
                continue
            self._h2d_stream(t.device)
            streams = [torch.cuda.current_stream(t.device)]
            if also is not None and also != streams[0]:
                streams.append(also)
            events = []
            for stream in streams:
                ev = torch.cuda.Event()  # type: ignore[no-untyped-call]
                ev.record(stream)
                events.append(ev)
            after[t.device] = events
        return after

    def _finish_eager_checks(
        self, eager: _Eager, work: list[tuple[dict[str, Any], torch.Tensor, torch.Tensor]], scale: float
    ) -> list[tuple[dict[str, Any], torch.Tensor, torch.Tensor]]:
        """The parameters still to update at the step (the others were updated during backward)."""
        grads = self._grads
        assert grads is not None
        if eager.done and scale != 1.0:
            raise ValueError(f"the update during backward ran unscaled, but step() got scale={scale}")
        for p in eager.done.values():
            if not grads.is_current(p):
                raise RuntimeError(
                    f"the gradient of a parameter of shape {tuple(p.shape)} changed after its update started during "
                    "backward (update_during_backward()): clip or edit gradients only without it"
                )
        return [(g, p, grad) for g, p, grad in work if id(p) not in eager.done]

    def _step_after_eager(
        self,
        eager: _Eager,
        work: list[tuple[dict[str, Any], torch.Tensor, torch.Tensor]],
        items: list[OffloadItem],
        deltas: list[tuple[torch.Tensor, torch.Tensor | None]],
    ) -> None:
        """Update the rest (parameters outside Blocks) after those started during backward, on the
        same thread, then wait for all of them."""
        grads = self._grads
        assert grads is not None
        jobs = self._jobs_from_host([p for _, p, _ in work], items)
        after = self._queued_readers([job.target for job in jobs])
        queue = self._adam_queue()
        if self.overlap_forward:
            self._land_rest_only(eager, jobs, after, queue, eager.deltas + deltas)
            return
        rest = self._in_background(lambda: start_host_update(jobs, self._chunk_numel, queue), after)
        done: dict[torch.device, torch.cuda.Event] = {}
        self.cpu_update_seconds = 0.0
        for f in [*eager.futures, rest]:
            result = f.result()
            done.update(result.done)  # in order: the last event per device follows every earlier copy there
            self.cpu_update_seconds += result.cpu_seconds
        for device, event in done.items():
            grads.set_free_event(grads.current, device, event)
            torch.cuda.current_stream(device).wait_event(event)  # later work sees the new parameters
        if self.record_delta:
            self._record_delta(eager.deltas + deltas)

    # --- overlap_forward: the Blocks' updates land at their first read ------------------------
    def _land_rest_only(
        self,
        eager: _Eager,
        jobs: list[HostJob],
        after: Events,
        queue: CpuAdamQueue | None,
        deltas: list[tuple[torch.Tensor, torch.Tensor | None]],
    ) -> None:
        """Update the parameters outside Blocks first (the forward reads them before any Block)
        and wait for them; the Blocks' updates land when each Block reads its parameters."""
        assert self._feeder is not None
        self._priority += 1
        priority = self._priority
        fed = self._feeder.submit(start_host_update, jobs, self._chunk_numel, queue, priority)  # after the Blocks' feeds
        self._lazy_step = _LazyStep(len(eager.landings), 0.0, deltas)
        for landing in eager.landings:
            for p in landing.params:
                self._lazy[id(p)] = landing
        self._land_result(fed.result().land(self._update, self._h2d, after))

    def _land_result(self, result: HostResult) -> None:
        """The copies of ``result`` are queued: later work on the current streams sees them."""
        grads, step = self._grads, self._lazy_step
        assert grads is not None and step is not None
        for device, event in result.done.items():
            grads.set_free_event(grads.current, device, event)  # the newest copy: after every earlier one there
            torch.cuda.current_stream(device).wait_event(event)
        step.seconds += result.cpu_seconds
        if step.left == 0:
            self._lazy_step = None
            self.cpu_update_seconds = step.seconds
            if self.record_delta:
                self._record_delta(step.deltas)

    def _land(self, landing: Landing) -> None:
        for p in landing.params:
            self._lazy.pop(id(p), None)
        step = self._lazy_step
        assert step is not None
        step.left -= 1
        self._land_result(landing.fed.result().land(self._update, self._h2d, landing.after))

    def _land_params(self, tensors: Sequence[torch.Tensor]) -> None:
        """bmt_comm's parameter wait: land the updates of any of ``tensors`` still in flight."""
        if not self._lazy:
            return
        for t in tensors:
            landing = self._lazy.get(id(t))
            if landing is not None:
                self._land(landing)

    def _land_all(self) -> None:
        while self._lazy:
            self._land(next(iter(self._lazy.values())))

    # --- overlap / delay_update --------------------------------------------------------------
    def _h2d_stream(self, device: torch.device) -> torch.cuda.Stream:
        s = self._h2d.get(device)
        if s is None:
            s = self._h2d[device] = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
        return s

    def _step_from_host(
        self,
        work: list[tuple[dict[str, Any], torch.Tensor, torch.Tensor]],
        items: list[OffloadItem],
        deltas: list[tuple[torch.Tensor, torch.Tensor | None]],
        landing: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> None:
        """``landing``: (parameter, staging) pairs of the device part's delayed update."""
        grads = self._grads
        assert grads is not None
        grads.track(self._offloaded())
        hosts = grads.collect([p for _, p, _ in work])
        jobs, targets = [], list(landing)
        for (_, p, _), it, host in zip(work, items, hosts, strict=True):
            out = host if host.dtype == p.dtype else self._out_buffer(p)
            target = it.param
            if self.delay_update:
                staging = self._staging_for(p, target)
                targets.append((target, staging))
                target = staging
            # the job holds no reference to the device gradient: a delayed job outlives the step, and
            # would keep the gradient's memory beside the one the next backward allocates
            jobs.append(HostJob(it._replace(grad=host), host, out, target))
        # the compute queued so far may still read the targets (or, delayed, the last landing reads staging)
        after = self._queued_readers([job.target for job in jobs])
        used = grads.current
        queue = self._adam_queue()
        if self.delay_update:
            assert self._worker is not None
            grads.flip()  # the next backward fills the other host copy while this one is read
            started = start_host_update(jobs, self._chunk_numel, queue)  # the C++ chunks start now

            def run() -> HostResult:
                result = started.land(self._update, self._h2d, after)
                for device, event in result.done.items():
                    grads.set_free_event(used, device, event)
                return result

            self._pending = _Pending(self._worker.submit(run), targets, deltas)
            return
        result = update_from_host(jobs, self._update, self._chunk_numel, self._h2d, after, queue)
        self.cpu_update_seconds = result.cpu_seconds
        for device, event in result.done.items():
            grads.set_free_event(used, device, event)
            torch.cuda.current_stream(device).wait_event(event)  # later work sees the new parameters
        if self.record_delta:
            self._record_delta(deltas)

    def _out_buffer(self, p: torch.Tensor) -> torch.Tensor:
        out = self._outs.get(id(p))
        if out is None or out.numel() != p.numel() or out.dtype != p.dtype:
            out = torch.empty(p.numel(), dtype=p.dtype, pin_memory=p.device.type == "cuda")
            self._outs[id(p)] = out
        return out

    @property
    def update_pending(self) -> bool:
        """A delayed update was computed (or is being computed) and has not landed yet."""
        return self._pending is not None

    def finish_update(self) -> None:
        """Land the delayed update still in flight (nothing to do without one): wait for the
        background Adam, then copy its new values into the parameters (on the current stream).
        With ``overlap_forward``, also land the updates started during the last backward that no
        Block has read yet."""
        self._land_all()
        pending, self._pending = self._pending, None
        if pending is None:
            return
        result = pending.future.result()  # re-raises an error of the background update; parameters stay as they were
        self.cpu_update_seconds = result.cpu_seconds
        for device, event in result.done.items():
            torch.cuda.current_stream(device).wait_event(event)
        with torch.no_grad():
            for param, staging in pending.targets:
                param.copy_(staging)
        if self.record_delta:
            self._record_delta(pending.deltas)

    def zero_grad(self, set_to_none: bool = False) -> None:
        super().zero_grad(set_to_none)
        if self._eager is not None and self._eager.checks is not None:
            self._undo_speculation()  # the step was skipped: what started during its backward is undone
            self._eager = None  # a checked backward (nothing else started) whose step was skipped
        if self._grads is not None:
            self._grads.forget()  # a new gradient could sit where the old one was copied from

    def state_dict(self, gather: bool = False) -> dict[str, Any]:  # type: ignore[override]
        self._undo_speculation()  # before the step's decision the state is the last step's (redone at the step)
        self.finish_update()  # the state and the parameters describe the same step
        return super().state_dict(gather)

    def load_state_dict(self, state_dict: Any) -> None:
        self._undo_speculation()  # an update from before the load must not be kept by the next step
        self.finish_update()  # a landing after the load would overwrite what it loaded
        super().load_state_dict(state_dict)

    def __del__(self) -> None:
        worker = getattr(self, "_worker", None)
        if worker is not None:
            # no wait: the jobs hold this optimizer, so none is left when it is collected (and this
            # may run on the worker thread itself, which cannot join itself)
            worker.shutdown(wait=False)
        feeder = getattr(self, "_feeder", None)
        if feeder is not None:
            feeder.shutdown(wait=False)
        queue = getattr(self, "_queue", None)
        if queue is not None:
            queue.close()
        spares = getattr(self, "_spares", None)
        if spares is not None:
            spares.close()  # after the queue: no job writes its buffers any more
        grads = getattr(self, "_grads", None)
        if grads is not None:
            grads.close()

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

    def _state_device(self, p: torch.Tensor) -> torch.device:
        return p.device if id(p) in getattr(self, "_on_device", ()) else torch.device("cpu")

    def _place(self, p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1).to(self._state_device(p), torch.float32, copy=True)

    def _zeros(self, p: torch.Tensor) -> torch.Tensor:
        return torch.zeros(p.numel(), dtype=torch.float32, device=self._state_device(p))

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


def _weak_call(obj: Any, method: Callable[[Any], None]) -> Callable[[], None]:
    """``method(obj)`` while ``obj`` lives (a callback that does not keep it alive)."""
    ref = weakref.ref(obj)

    def call() -> None:
        target = ref()
        if target is not None:
            method(target)

    return call
