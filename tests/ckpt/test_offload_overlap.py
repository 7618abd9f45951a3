"""``AdamOffloadOptimizer(overlap=True)`` and ``(delay_update=True)`` over Blocks.

- overlap: the gradients of Blocks are on the host before ``step`` (copied when each Block's
  backward finished), and the training is bit-identical to the default offload step, with
  accumulation, clipping (which changes gradients after their copy), the non-finite guard, and
  a parameter outside any Block; at a ZeRO group of one (in place) and of two (reduce-scatter).
- delay_update: step t's update lands at step t+1; the parameters equal a plain-torch run of the
  same delayed scheme (torch's Adam on fp32 parameters, the offload optimizer's fp32 update),
  and a state dict, a save and a skipped step land the update in flight first.
"""

from __future__ import annotations

import gc
import os
import weakref
from typing import Any

import pytest
import torch

from .models import Config, batch, causal_mask, distribute_, make_layers, plain_copy, rows

LR = 1e-2


class _Model(torch.nn.Module):
    def __init__(self, blocks: torch.nn.Module, head: torch.nn.Module) -> None:
        super().__init__()
        self.blocks = blocks
        self.head = head

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x, mask))


class _Layers(torch.nn.Module):
    """Plain torch's TransformerBlockList: the layers one after the other."""

    def __init__(self, layers: torch.nn.ModuleList) -> None:
        super().__init__()
        self.layers = layers

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, mask)
        return x


def _device() -> torch.device:
    import bmt_comm

    return bmt_comm.get_context().device


def _plain(cfg: Config) -> torch.nn.Module:
    layers = make_layers(cfg, seed=5)
    torch.manual_seed(6)
    return _Model(_Layers(layers), torch.nn.Linear(cfg.dim, cfg.dim)).to(_device())


def _build(cfg: Config, dtype: torch.dtype, plain_head: bool) -> torch.nn.Module:
    from bmt_ckpt import Block, TransformerBlockList

    layers = make_layers(cfg, seed=5).to(dtype=dtype, device=_device())
    torch.manual_seed(6)
    head = torch.nn.Linear(cfg.dim, cfg.dim).to(dtype=dtype, device=_device())
    if not plain_head:
        head = Block(distribute_(head))
    return _Model(TransformerBlockList([Block(distribute_(plain_copy(m))) for m in layers]), head)


def _train(model: torch.nn.Module, opt: Any, cfg: Config, steps: int, check_streamed: bool) -> list[bool]:
    import bmt_comm
    from bmt_optim import OptimManager

    manager = OptimManager(loss_scale=None)
    manager.add_optimizer(opt)
    rank, world = bmt_comm.rank(), bmt_comm.world_size()
    mask = causal_mask(cfg.seq).to(_device())
    taken = []
    for step in range(steps):
        x, target = batch(cfg, 4 * world, seed=70 + step)
        x, target = rows(x, rank, world).to(_device()), rows(target, rank, world).to(_device())
        if step == 2:
            x = x.clone()
            x[0, 0, 0] = float("nan")  # the guard skips this step on every rank
        for xb, tb in zip(x.chunk(2), target.chunk(2), strict=True):  # two accumulated micro-batches
            manager.backward(((model(xb.to(opt.param_groups[0]["params"][0].dtype), mask).float() - tb) ** 2).mean())
        if check_streamed and step != 2:
            copies = {id(p): c for p, c in zip(opt._grads._params, opt._grads._copies, strict=True)}
            for name, p in model.blocks.named_parameters():
                assert copies[id(p)].mark is not None, f"step {step}: {name}'s gradient was not copied during backward"
        if step == 1:
            manager.clip_grad_norm(opt.param_groups, max_norm=0.01)  # after the copies: they are stale now
        taken.append(manager.step())
        manager.zero_grad(set_to_none=step % 2 == 1)
    return taken


def _final_state(model: torch.nn.Module, opt: Any) -> tuple[dict[str, torch.Tensor], dict[int, dict[str, torch.Tensor]]]:
    """The model's state dict and the optimizer's state tensors, copied."""
    params = {k: v.clone() for k, v in model.state_dict().items()}
    state = {i: {k: t.clone() for k, t in s.items() if torch.is_tensor(t)} for i, s in opt.state_dict()["state"].items()}
    return params, state


def _assert_identical(a: tuple[dict[str, Any], dict[int, Any]], b: tuple[dict[str, Any], dict[int, Any]], what: str) -> None:
    for key, value in a[0].items():
        assert torch.equal(b[0][key], value), f"{what}: {key} differs from the default offload step"
    for i, state in a[1].items():
        for key, value in state.items():
            assert torch.equal(b[1][i][key], value), f"{what}: optimizer state {i}/{key} differs"


def _overlap_is_exact(dtype_name: str, plain_head: bool) -> None:
    from bmt_optim import AdamOffloadOptimizer

    dtype = getattr(torch, dtype_name)
    cfg = Config()
    results = []
    for overlap in (False, True):
        model = _build(cfg, dtype, plain_head)
        opt = AdamOffloadOptimizer(model.parameters(), lr=LR, weight_decay=0.1, chunk_numel=100, num_threads=2,
                                   overlap=overlap)
        taken = _train(model, opt, cfg, 4, check_streamed=overlap)
        assert taken == [True, True, False, True], taken
        if overlap:
            _check_queue_used(opt, dtype)
        results.append(_final_state(model, opt))
    _assert_identical(*results, f"{dtype_name}, overlap=True")


def _check_queue_used(opt: Any, dtype: torch.dtype) -> None:
    """With the C++ kernel, the bf16/fp16 chunks ran on the queue's thread (fp32 ones never do)."""
    from bmt_optim.cpu_adam import native_available

    if dtype == torch.float32 or not native_available():
        assert opt._queue is None or opt._queue.completed == 0
        return
    assert opt._queue is not None and opt._queue.completed > 0 and opt._queue.outstanding == 0
    assert opt.cpu_update_seconds > 0


@pytest.mark.parametrize("world_size", [1])
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_overlap_is_exact_in_place(spawn: Any, world_size: int, dtype_name: str) -> None:
    spawn(_overlap_is_exact, dtype_name, True)


@pytest.mark.parametrize("world_size", [2])
def test_overlap_is_exact_sharded(spawn: Any, world_size: int) -> None:
    spawn(_overlap_is_exact, "bfloat16", False)


def _delayed_matches_reference(tmp: str) -> None:
    import bmt_comm
    from bmt_optim import AdamOffloadOptimizer, OptimManager
    from bmt_zero.store import save, save_sharded

    cfg = Config()
    mask = causal_mask(cfg.seq).to(_device())
    model = _build(cfg, torch.float32, plain_head=True)
    visible = _plain(cfg)  # the reference's parameters that forward and backward see
    master = [p.detach().clone().requires_grad_(True) for p in visible.parameters()]
    ref_opt = torch.optim.Adam(master, lr=LR, weight_decay=0.1)
    opt = AdamOffloadOptimizer(model.parameters(), lr=LR, weight_decay=0.1, chunk_numel=100, num_threads=2,
                               delay_update=True)
    manager = OptimManager(loss_scale=None)
    manager.add_optimizer(opt)

    def loss_of(m: torch.nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return ((m(x, mask) - t) ** 2).mean()

    def check(what: str, expect: list[torch.Tensor]) -> None:
        for (name, p), e in zip(model.named_parameters(), expect, strict=True):
            torch.testing.assert_close(p.detach().reshape(e.shape), e.detach(), rtol=1e-6, atol=1e-6, msg=lambda m, n=name: f"{what}: {n}: {m}")

    for step in range(5):
        x, target = (t.to(_device()) for t in batch(cfg, 4, seed=90 + step))
        loss_of(visible, x, target).backward()
        for p, q in zip(visible.parameters(), master, strict=True):
            p.data.copy_(q.detach())  # the update of the last step lands now ...
            q.grad, p.grad = p.grad, None  # ... and this step's gradient, taken before it, feeds the next one
        ref_opt.step()
        manager.backward(loss_of(model, x, target))
        grad_ref = weakref.ref(model.head.weight.grad)
        assert manager.step()
        manager.zero_grad(set_to_none=step == 4)
        assert opt.update_pending
        if step == 4:  # the update in flight holds no device gradient: dropped, it is freed at once
            gc.collect()
            assert grad_ref() is None, "the delayed update keeps the device gradient alive"
        check(f"after step {step}", list(visible.parameters()))
        if step == 1:
            opt.state_dict()  # lands the update in flight
            assert not opt.update_pending
            check("after state_dict()", master)
            for p, q in zip(visible.parameters(), master, strict=True):
                p.data.copy_(q.detach())
        if step in (2, 3):
            if step == 2:  # bmt.store.save_sharded lands it (bmt_comm.flush_pending_writes)
                save_sharded(model, os.path.join(tmp, "sharded"))
            else:  # and bmt.save
                save(model, os.path.join(tmp, "model.pt"))
            assert not opt.update_pending
            check(f"after the save of step {step}", master)
            for p, q in zip(visible.parameters(), master, strict=True):
                p.data.copy_(q.detach())
    # a skipped step still lands the update of the step before it, and starts none
    x, target = (t.to(_device()) for t in batch(cfg, 4, seed=99))
    manager.backward(loss_of(model, x, target) * float("nan"))
    with pytest.warns(RuntimeWarning):
        assert not manager.step()
    assert not opt.update_pending
    check("after a skipped step", master)
    bmt_comm.synchronize()


def _delayed_queue_matches_direct_calls() -> None:
    """bf16 parameters, delayed: the C++ chunks on the queue's thread leave what direct kernel
    calls chunk by chunk from the worker thread leave, bit for bit (accumulation, clipping, a
    skipped step)."""
    from bmt_optim import AdamOffloadOptimizer
    from bmt_optim.cpu_adam import native_available

    if not native_available():
        pytest.skip("the C++ CPU Adam is not built here")
    cfg = Config()
    results = []
    for queued in (True, False):
        model = _build(cfg, torch.bfloat16, plain_head=True)
        opt = AdamOffloadOptimizer(model.parameters(), lr=LR, weight_decay=0.1, chunk_numel=100, num_threads=2,
                                   delay_update=True)
        if not queued:
            opt._adam_queue = lambda: None  # type: ignore[method-assign]
        taken = _train(model, opt, cfg, 4, check_streamed=True)
        assert taken == [True, True, False, True], taken
        opt.finish_update()
        if queued:
            _check_queue_used(opt, torch.bfloat16)
        else:
            assert opt._queue is None
        results.append(_final_state(model, opt))
    _assert_identical(*results, "bfloat16, delay_update=True through the queue")


@pytest.mark.parametrize("world_size", [1])
def test_delayed_update_through_the_queue_is_bitwise_the_direct_path(spawn: Any, world_size: int) -> None:
    spawn(_delayed_queue_matches_direct_calls)


@pytest.mark.parametrize("world_size", [1])
def test_delayed_update_matches_a_delayed_reference(spawn: Any, world_size: int, tmp_path: Any) -> None:
    spawn(_delayed_matches_reference, str(tmp_path))


def test_flags_are_checked() -> None:
    from bmt_optim import AdamOffloadOptimizer

    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(TypeError, match="overlap must be a bool"):
        AdamOffloadOptimizer([p], overlap=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="delay_update must be a bool"):
        AdamOffloadOptimizer([p], delay_update="yes")  # type: ignore[arg-type]
    opt = AdamOffloadOptimizer([p], delay_update=True)
    assert opt.overlap and opt.delay_update and not opt.update_pending
    with pytest.raises(ValueError, match="overlap_forward=True and delay_update=True exclude each other"):
        AdamOffloadOptimizer([p], delay_update=True, overlap_forward=True)
    opt = AdamOffloadOptimizer([p], overlap_forward=True)
    assert opt.overlap and opt.overlap_forward


def test_grad_ready_hooks_register_and_remove() -> None:
    import bmt_comm

    seen: list[int] = []

    class Owner:
        def hook(self, info: bmt_comm.GradReady) -> None:
            seen.append(len(info.tensors))
            info.add_reader("event")  # type: ignore[arg-type]

    owner = Owner()
    handle = bmt_comm.register_grad_ready_hook(owner.hook)
    t = torch.zeros(2)
    assert bmt_comm.notify_grad_ready([t, t], None) == ["event"]
    assert seen == [2]
    handle.remove()
    assert bmt_comm.notify_grad_ready([t], None) == [] and seen == [2]
    bmt_comm.register_grad_ready_hook(owner.hook)
    del owner  # a bound method is held weakly: the hook goes with its owner
    assert bmt_comm.notify_grad_ready([t], None) == [] and seen == [2]
    assert not bmt_comm.has_grad_ready_hooks()


def test_param_waits_register_and_remove() -> None:
    import bmt_comm

    seen: list[list[int]] = []

    class Owner:
        def wait(self, tensors: Any) -> None:
            seen.append([t.numel() for t in tensors])

    owner = Owner()
    handle = bmt_comm.register_param_wait(owner.wait)
    assert bmt_comm.has_param_waits()
    bmt_comm.wait_param_writes([torch.zeros(2), torch.zeros(3)])
    assert seen == [[2, 3]]
    handle.remove()
    bmt_comm.wait_param_writes([torch.zeros(1)])
    assert seen == [[2, 3]] and not bmt_comm.has_param_waits()
    bmt_comm.register_param_wait(owner.wait)
    del owner  # held weakly, as the gradient-ready hooks
    bmt_comm.wait_param_writes([torch.zeros(1)])
    assert seen == [[2, 3]] and not bmt_comm.has_param_waits()


def _eager_is_exact(dtype_name: str, plain_head: bool, lazy: bool = False) -> None:
    """``OptimManager.update_during_backward()``: the Blocks' updates start during the last
    micro-batch's backward; the result is bit-identical to the default offload step. ``lazy``:
    with ``overlap_forward=True``, ``step()`` returns with the Blocks' updates still in flight and
    each lands at the Block's first read in the next forward (or the state dicts at the end)."""
    import bmt_comm
    from bmt_optim import AdamOffloadOptimizer, OptimManager

    dtype = getattr(torch, dtype_name)
    cfg = Config()
    rank, world = bmt_comm.rank(), bmt_comm.world_size()
    mask = causal_mask(cfg.seq).to(_device())
    results = []
    for eager in (False, True):
        model = _build(cfg, dtype, plain_head)
        opt = AdamOffloadOptimizer(model.parameters(), lr=LR, weight_decay=0.1, chunk_numel=100, num_threads=2,
                                   overlap=eager, overlap_forward=eager and lazy)
        manager = OptimManager(loss_scale=None, skip_nonfinite=False)
        block_params = list(model.blocks.parameters()) + ([] if plain_head else list(model.head.parameters()))
        manager.add_optimizer(opt)
        for step in range(3):
            x, target = batch(cfg, 4 * world, seed=80 + step)
            x, target = rows(x, rank, world).to(_device()), rows(target, rank, world).to(_device())
            chunks = list(zip(x.chunk(2), target.chunk(2), strict=True))
            for k, (xb, tb) in enumerate(chunks):
                loss = ((model(xb.to(dtype), mask).float() - tb) ** 2).mean()
                if eager and lazy:
                    assert not opt._lazy, f"step {step}: a Block's update did not land in the forward that read it"
                if eager and k == len(chunks) - 1:
                    with manager.update_during_backward():
                        manager.backward(loss)
                    started = opt._eager.done
                    assert all(id(p) in started for p in block_params), f"step {step}: not every Block's update started"
                    assert len(started) == len(block_params)  # the plain head waits for step()
                else:
                    manager.backward(loss)
            assert manager.step()
            if eager and lazy:  # the Blocks' new values are still in flight; the rest has landed
                assert set(opt._lazy) == {id(p) for p in block_params}, f"step {step}: not every Block's update is pending"
            manager.zero_grad(set_to_none=step == 1)
        results.append(_final_state(model, opt))  # (the model's state dict lands what is still in flight)
        if eager:
            assert not opt._lazy
            _check_queue_used(opt, dtype)
    _assert_identical(*results, f"{dtype_name}, update_during_backward(){' with overlap_forward' if lazy else ''}")


@pytest.mark.parametrize("world_size", [1])
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_update_during_backward_is_exact_in_place(spawn: Any, world_size: int, dtype_name: str) -> None:
    spawn(_eager_is_exact, dtype_name, True)


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_overlap_forward_is_exact(spawn: Any, world_size: int, dtype_name: str) -> None:
    """In place (a group of one) and sharded (the gather reads the shard on the load stream)."""
    spawn(_eager_is_exact, dtype_name, world_size == 1, True)


@pytest.mark.parametrize("world_size", [2])
def test_update_during_backward_is_exact_sharded(spawn: Any, world_size: int) -> None:
    spawn(_eager_is_exact, "bfloat16", False)


def _eager_rules() -> None:
    from bmt_optim import AdamOffloadOptimizer, AdamOptimizer, OptimManager

    cfg = Config()
    mask = causal_mask(cfg.seq).to(_device())
    model = _build(cfg, torch.float32, plain_head=True)
    x, target = (t.to(_device()) for t in batch(cfg, 2, seed=1))
    guarded = OptimManager(loss_scale=None)
    checked = AdamOffloadOptimizer(model.parameters(), overlap=True)
    guarded.add_optimizer(checked)
    with guarded.update_during_backward():  # guarded: the Blocks' gradients are only checked
        guarded.backward(((model(x, mask) - target) ** 2).mean())
    assert checked._eager is not None and checked._eager.checks is not None and not checked._eager.done
    guarded.zero_grad()
    assert checked._eager is None
    plain = OptimManager(loss_scale=None, skip_nonfinite=False)
    plain.add_optimizer(AdamOptimizer(model.parameters()))
    with pytest.raises(ValueError, match=r"AdamOffloadOptimizer\(overlap=True\)"), plain.update_during_backward():
        pass
    no_overlap = OptimManager(loss_scale=None, skip_nonfinite=False)
    no_overlap.add_optimizer(AdamOffloadOptimizer(model.parameters()))
    with pytest.raises(ValueError, match="overlap=False"), no_overlap.update_during_backward():
        pass
    manager = OptimManager(loss_scale=None, skip_nonfinite=False)
    opt = AdamOffloadOptimizer(model.parameters(), overlap=True)
    manager.add_optimizer(opt)
    with manager.update_during_backward():
        manager.backward(((model(x, mask) - target) ** 2).mean())
    with pytest.raises(RuntimeError, match=r"already used the unclipped gradients.*defer=True"):
        manager.clip_grad_norm(opt.param_groups, max_norm=1.0)
    assert manager.step()
    # an in-place change of a consumed gradient is caught at the step
    with manager.update_during_backward():
        manager.backward(((model(x, mask) - target) ** 2).mean())
    next(model.blocks.parameters()).grad.mul_(2)
    with pytest.raises(RuntimeError, match="changed after its update started during backward"):
        manager.step()


@pytest.mark.parametrize("world_size", [1])
def test_update_during_backward_rules(spawn: Any, world_size: int) -> None:
    spawn(_eager_rules)


def _partial_offload(mode: str) -> None:
    """``offload_fraction=0.5``: the first layers' state stays on their device and is updated by
    the fused kernel; the training equals full offload's to rounding (fp32 masters to rtol=1e-5,
    atol=1e-6 after 3 steps; each bf16 parameter is its master rounded), in every mode."""
    import bmt_comm
    from bmt_optim import AdamOffloadOptimizer, OptimManager

    cfg = Config()
    mask = causal_mask(cfg.seq).to(_device())
    results = []
    for fraction in (1.0, 0.5):
        model = _build(cfg, torch.bfloat16, plain_head=True)
        opt = AdamOffloadOptimizer(model.parameters(), lr=LR, weight_decay=0.1, chunk_numel=100, num_threads=2,
                                   overlap=mode in ("overlap", "eager"), delay_update=mode == "delayed",
                                   overlap_forward=mode == "lazy", offload_fraction=fraction)
        manager = OptimManager(loss_scale=None, skip_nonfinite=mode not in ("eager", "lazy"))
        manager.add_optimizer(opt)
        params = list(model.parameters())
        kept = [p for p in params if id(p) in opt._on_device]
        if fraction < 1:
            total = sum(p.numel() for p in params)
            assert kept and kept[0] is params[0], "the first parameters stay on the device"
            assert 0.3 * total <= sum(p.numel() for p in kept) <= 0.5 * total
        for step in range(3):
            x, target = (t.to(_device()) for t in batch(cfg, 4, seed=60 + step))
            loss = ((model(x.to(torch.bfloat16), mask).float() - target) ** 2).mean()
            if mode in ("eager", "lazy"):
                with manager.update_during_backward():
                    manager.backward(loss)
            else:
                manager.backward(loss)
            assert manager.step()
            manager.zero_grad()
        opt.finish_update()
        for p in params:
            state = opt.state[p]
            want = _device() if id(p) in opt._on_device else torch.device("cpu")
            assert state["exp_avg"].device.type == want.type, f"state of a parameter on {state['exp_avg'].device}"
            # the parameter is its master rounded (a DistributedParameter of a Block is the flat shard)
            assert torch.equal(p.detach().reshape(-1), state["_param_fp32"].to(p.device, p.dtype))
        results.append([opt.state[p]["_param_fp32"].cpu() for p in params])
        if fraction < 1:  # the state dict moves between the two layouts
            full = AdamOffloadOptimizer(model.parameters(), lr=LR, weight_decay=0.1)
            full.load_state_dict(opt.state_dict())
            assert all(full.state[p]["exp_avg"].device.type == "cpu" for p in params)
            for p in params:
                assert torch.equal(full.state[p]["exp_avg_sq"], opt.state[p]["exp_avg_sq"].cpu())
    for i, (a, b) in enumerate(zip(*results, strict=True)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=lambda m, i=i: f"{mode}: master of param {i}: {m}")
    bmt_comm.synchronize()


@pytest.mark.parametrize("world_size", [1])
@pytest.mark.parametrize("mode", ["step", "overlap", "eager", "lazy", "delayed"])
def test_partial_offload(spawn: Any, world_size: int, mode: str) -> None:
    spawn(_partial_offload, mode)


def test_offload_fraction_is_checked() -> None:
    from bmt_optim import AdamOffloadOptimizer

    p = torch.nn.Parameter(torch.zeros(3))
    for bad in (0.0, 1.5, -1):
        with pytest.raises(ValueError, match="offload_fraction must be in"):
            AdamOffloadOptimizer([p], offload_fraction=bad)
    with pytest.raises(ValueError, match="record_delta needs offload_fraction=1"):
        AdamOffloadOptimizer([p], offload_fraction=0.5, record_delta=True)
