"""DistributedParameter and gather_full: shards, full tensors, gradients, in-block pieces."""

from __future__ import annotations

import pytest
import torch
from bmt_zero import Partition

from ._util import assert_close

SHAPES = [(7,), (3, 5), (2,), (1,), (0,), (4, 3, 2), (1001,)]


def _full(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g)


def _uneven_ranges(numel: int, size: int) -> list[tuple[int, int]]:
    """Contiguous pieces in rank order, deliberately uneven, some empty (like a Block's layout)."""
    cuts = sorted({0, numel, *[(numel * (3 * r + 1)) // (3 * size) for r in range(1, size)]})
    cuts += [numel] * (size + 1 - len(cuts))
    ranges = [(cuts[r], cuts[r + 1]) for r in range(size)]
    return ranges[::-1] if size > 2 else ranges  # rank order need not follow element order


@pytest.mark.parametrize("numel", [0, 1, 3, 8, 10])
@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_partition_tiles(numel, size):
    parts = [Partition(numel, size, r) for r in range(size)]
    assert sum(p.local_numel for p in parts) == numel
    assert all(p.shard_numel * size == p.padded_numel >= numel for p in parts)
    covered = 0
    for p in parts:
        assert p.start == covered or p.local_numel == 0
        covered = max(covered, p.end)
    assert covered == numel
    if numel < size:
        assert any(p.local_numel == 0 for p in parts)


def test_partition_rejects_bad_input():
    with pytest.raises(ValueError, match="invalid partition"):
        Partition(4, 2, 2)


def _check_gather() -> None:
    import bmt_comm
    from bmt_zero import DistributedParameter, gather_for_state, gather_full, gather_to

    ctx = bmt_comm.get_context()
    rank, n = ctx.rank, ctx.world_size
    for i, shape in enumerate(SHAPES):
        full = _full(shape, i)
        p = DistributedParameter(full)
        part = Partition(full.numel(), n, rank)
        assert p.dim() == 1 and p.numel() == part.local_numel, (shape, p.shape)
        assert (p._start_partition, p._end_partition) == (part.start, part.end)
        assert torch.equal(p.detach(), full.reshape(-1)[part.start : part.end])
        assert torch.equal(p.gather(), full)
        assert torch.equal(gather_full(p), full)
        to0 = gather_full(p, dst=0)
        assert (to0 is not None and torch.equal(to0, full)) if rank == 0 else to0 is None
        with gather_to(0):
            st = gather_for_state(p)
        assert (st is not None and torch.equal(st, full)) if rank == 0 else st is None

        # built without a full tensor: shape or meta tensor, shard only
        for src in (shape, torch.empty(shape, device="meta")):
            q = DistributedParameter(src, dtype=torch.float32)
            assert q.numel() == part.local_numel and torch.equal(q.gather(), torch.zeros(shape))

        # in a Block: `.data` is a view into a flat buffer, pieces uneven, some empty
        ranges = _uneven_ranges(full.numel(), n)
        start, end = ranges[rank]
        flat = torch.full((end - start + 9,), float("nan"))
        flat[5 : 5 + end - start] = full.reshape(-1)[start:end]
        q = DistributedParameter(shape, dtype=torch.float32)
        q.data = flat[5 : 5 + end - start]
        q._in_block, q._start_partition, q._end_partition = True, start, end
        assert torch.equal(gather_full(q), full)
        to0 = gather_full(q, dst=0)
        assert (to0 is not None and torch.equal(to0, full)) if rank == 0 else to0 is None

    # in-block pieces that do not tile the tensor are an error on every rank, not garbage
    q = DistributedParameter((6,), dtype=torch.float32)
    q._in_block, q._start_partition, q._end_partition = True, 0, q.numel()
    q.data = torch.zeros(q.numel())
    if n > 1:
        with pytest.raises(RuntimeError, match="must tile"):
            gather_full(q)
    with pytest.raises(RuntimeError, match="gather\\(\\) is for parameters outside a Block"):
        q.gather()
    with pytest.raises(ValueError, match="dst rank 99 is not in"):
        gather_full(DistributedParameter((3,)), dst=99)
    with pytest.raises(TypeError, match="cannot be pickled"):
        import pickle

        pickle.dumps(DistributedParameter((3,)))


def _loss(x: torch.Tensor, rank: int) -> torch.Tensor:
    a = _full(tuple(x.shape), 100 + rank)
    return ((x * a).tanh() * (rank + 1)).sum() + (x**2).mean()


def _check_gather_and_gradient() -> None:
    _check_gather()
    _check_gradient()


def _check_gradient() -> None:
    import bmt_comm
    from bmt_zero import DistributedParameter

    ctx = bmt_comm.get_context()
    rank, n = ctx.rank, ctx.world_size
    for i, shape in enumerate([(5, 3), (2,), (13,)]):
        full = _full(shape, 50 + i)
        p = DistributedParameter(full)
        _loss(p.gather(), rank).backward()
        _loss(p.gather(), rank).backward()  # gradients accumulate over calls

        ref = full.clone().requires_grad_(True)  # one process: the sum of every rank's loss, twice
        sum(_loss(ref, r) for r in range(n)).backward()
        part = Partition(full.numel(), n, rank)
        assert p.grad is not None and p.grad.shape == p.shape
        assert_close(p.grad, 2 * ref.grad.reshape(-1)[part.start : part.end], what=f"grad of {shape}")


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_gather_and_gradient(spawn, world_size):
    spawn(_check_gather_and_gradient)


def _check_public_fields() -> None:
    """What other packages read, under public names: the same values as 1.0.1's private fields,
    before and after a Block's storage takes the parameter."""
    import bmt_comm
    from bmt_ckpt import Block
    from bmt_zero import DistributedParameter

    comms = bmt_comm.get_context().comms
    plain = DistributedParameter(torch.zeros(6, 4))
    split = DistributedParameter(torch.zeros(6, 4), tp_mode=True, tp_split_dim=0)
    for p in (plain, split):
        assert (p.original_shape, p.tp_mode, p.tp_split_dim, p.tp_original_shape, p.in_block) == (
            p._original_shape, p._tp_mode, p._tp_split_dim, p._tp_original_shape, p._in_block)
        assert (p.shard_start, p.shard_end, p.shard_comm) == (p._start_partition, p._end_partition, p._zero_comm)
    assert plain.original_shape == (6, 4) and not plain.tp_mode and plain.tp_split_dim == -1 and not plain.in_block
    assert split.tp_mode and split.tp_split_dim == 0 and split.tp_original_shape == (6 * comms.tp.size, 4)
    layer = torch.nn.Linear(4, 6, bias=False)
    layer.weight = plain
    Block(layer)
    assert plain.in_block and plain.shard_comm is comms.zero and plain.original_shape == (6, 4)
    # init_method: read and set under its public name, the same field as 1.0.1's _init_method
    assert plain.init_method is None
    plain.init_method = torch.nn.init.ones_
    assert plain._init_method is torch.nn.init.ones_
    with pytest.raises(TypeError, match="init_method must be callable"):
        plain.init_method = 3  # type: ignore[assignment]


@pytest.mark.parametrize("world_size", [1, 2])
def test_public_fields(spawn, world_size):
    spawn(_check_public_fields, tp_size=world_size)
