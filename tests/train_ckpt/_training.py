"""A small run to checkpoint: two transformer Blocks with dropout and a ZeRO head, Adam (on the
device or offloaded), a cosine schedule and an OptimManager with a loss scale that moves.

``run`` trains steps ``[start, stop)`` of one fixed schedule (batch ``step`` is the same rows
whatever the world size: each rank takes its share of 8), optionally loading a checkpoint first
and saving some on the way, and returns the local losses plus, on rank 0, the gathered model and
optimizer state at chosen steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ..ckpt.models import Config, batch, distribute_, make_layers, rows

GLOBAL_BATCH = 8  # rows per step over all ranks: worlds 1, 2 and 4 split it evenly


@dataclass(frozen=True)
class Plan:
    optimizer: str = "adam"  # "adam" | "offload"
    dropout: float = 0.1
    stop: int = 6
    root: str | None = None
    load: bool = False  # resume from ``root`` first
    save_at: tuple[int, ...] = ()  # save after these steps into ``root``
    keep_last: int | None = None
    sharded: bool = True
    snapshot_at: tuple[int, ...] = ()  # gathered model + optimizer state after these steps (0: before)
    dtype: str = "float32"
    head: int = 16  # the head's output width: another value makes another model
    flat: bool = False  # the optimizer holds the Blocks' flat shards (bmt_zero.grouped_parameters), not the parameters
    offload_options: tuple[tuple[str, Any], ...] = ()  # keywords of AdamOffloadOptimizer, e.g. (("delay_update", True),)
    legacy_layout: bool = False  # save flat shards' layout as checkpoints did before they were recognised
    extra: dict[str, Any] = field(default_factory=dict)


def build(plan: Plan) -> tuple[torch.nn.Module, Any, Any]:
    import bmt_comm
    from bmt_ckpt import Block, TransformerBlockList
    from bmt_optim import AdamOffloadOptimizer, AdamOptimizer, OptimManager
    from bmt_optim.lr_scheduler import Cosine
    from bmt_zero import DistributedModule, DistributedParameter

    cfg = Config(dim=16, heads=2, hidden=24, layers=2, seq=5, dropout=plan.dropout)
    device = bmt_comm.get_context().device
    dtype = getattr(torch, plan.dtype)

    class Net(DistributedModule):
        def __init__(self) -> None:
            super().__init__()
            layers = make_layers(cfg, seed=7).to(device=device, dtype=dtype)
            self.blocks = TransformerBlockList([Block(distribute_(m), use_checkpoint=True) for m in layers])
            g = torch.Generator().manual_seed(3)
            self.head = DistributedParameter((torch.randn(cfg.dim, plan.head, generator=g) * 0.2).to(device, dtype))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.blocks(x) @ self.head  # (B, T, C)

    model = Net()
    adam = AdamOptimizer if plan.optimizer == "adam" else AdamOffloadOptimizer
    if plan.flat:
        from bmt_zero import grouped_parameters

        params = [p for _, ps in grouped_parameters(model) for p in ps]
    else:
        params = list(model.parameters())
    opt = adam(params, lr=1e-2, weight_decay=0.01, **dict(plan.offload_options))
    sched = Cosine(opt, start_lr=1e-2, warmup_iter=2, end_iter=10)
    manager = OptimManager(loss_scale=2.0**10, loss_scale_steps=2, max_loss_scale=2.0**12)
    manager.add_optimizer(opt, sched)
    return model, opt, manager


def snapshot(model: torch.nn.Module, opt: Any, manager: Any) -> dict[str, Any] | None:
    """Collective: rank 0 gets the whole model, the whole optimizer state and the scalars."""
    import bmt_comm
    from bmt_zero.store import _save_to_rank0

    state = {k: v.detach().cpu().clone() for k, v in _save_to_rank0(model).items()}
    osd = opt.state_dict(gather=True)
    if bmt_comm.get_context().rank != 0:
        return None
    scalars = {k: v for k, v in manager.state_dict().items() if k != "optimizers"}
    return {"model": state, "optim": osd["state"], "groups": osd["param_groups"], "manager": scalars}


def run(plan: Plan) -> dict[str, Any]:
    import bmt_comm
    from bmtrain import load_checkpoint, save_checkpoint

    ctx = bmt_comm.get_context()
    rank, world = ctx.rank, ctx.world_size
    if plan.legacy_layout:
        import functools

        from bmtrain.checkpoint import _optim, save

        save.layout_of = functools.partial(_optim.layout_of, legacy=True)  # type: ignore[assignment]
    model, opt, manager = build(plan)
    start, info = 0, None
    if plan.load:
        assert plan.root is not None
        info = load_checkpoint(plan.root, model, manager)
        assert info is not None
        start = info.step
    out: dict[str, Any] = {"losses": {}, "snapshots": {}, "info": info}
    if 0 in plan.snapshot_at or (plan.load and start in plan.snapshot_at):
        out["snapshots"][start] = snapshot(model, opt, manager)
    dtype = getattr(torch, plan.dtype)
    for step in range(start, plan.stop):
        cfg = Config(dim=16, heads=2, hidden=24, layers=2, seq=5)
        x, y = batch(cfg, GLOBAL_BATCH, seed=100 + step)
        x, y = (rows(t, rank, world).to(ctx.device, dtype) for t in (x, y))
        manager.zero_grad()
        loss = F.mse_loss(model(x).float(), y.float())
        manager.backward(loss)
        manager.step()
        out["losses"][step + 1] = loss.item()
        if step + 1 in plan.save_at:
            assert plan.root is not None
            save_checkpoint(plan.root, model, manager, step=step + 1, extra={"rank": rank, **plan.extra},
                            keep_last=plan.keep_last, sharded=plan.sharded)
        if step + 1 in plan.snapshot_at:
            out["snapshots"][step + 1] = snapshot(model, opt, manager)
    out["shards"] = {n: p.detach().cpu().clone() for n, p in model.named_parameters()}
    return out


def assert_same(a: Any, b: Any, what: str) -> None:
    """Bitwise equality of nested dicts/lists of tensors and numbers."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, f"{what}: {a} vs {b}"
        assert torch.equal(a, b), f"{what}: max |diff| {(a.double() - b.double()).abs().max().item():.3g}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{what}: keys {sorted(a)} vs {sorted(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{what}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{what}: length {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{what}[{i}]")
    else:
        assert a == b, f"{what}: {a!r} vs {b!r}"
