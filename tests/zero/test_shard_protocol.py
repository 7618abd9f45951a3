"""The ``bmt_comm.Shard`` protocol: DistributedParameters and flat storage tensors implement it,
and bmt-optim's norm and gathered state read it (checked against plain torch on the whole
tensors)."""

from __future__ import annotations

import pytest
import torch

# --- tier 1: no process group ----------------------------------------------------------------


def test_plain_tensors_are_whole_and_marked_ones_are_shards():
    import bmt_comm

    t = torch.zeros(3)
    assert not isinstance(t, bmt_comm.Shard) and bmt_comm.check_shard(t) is None
    with pytest.raises(ValueError, match=r"got \[2, 4\) of 10 for a tensor of 3 elements"):
        bmt_comm.mark_shard(t, 2, 4, 10, object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"got \[8, 11\) of 10"):
        bmt_comm.mark_shard(t, 8, 11, 10, object())  # type: ignore[arg-type]
    comm = object()
    assert bmt_comm.mark_shard(t, 2, 5, 10, comm) is t  # type: ignore[arg-type]
    assert isinstance(t, bmt_comm.Shard) and bmt_comm.check_shard(t) is t
    assert (t.shard_start, t.shard_end, t.whole_numel, t.shard_comm) == (2, 5, 10, comm)  # type: ignore[attr-defined]
    t.shard_end = 6  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match=r"inconsistent shard: \[2, 6\) of 10 elements, but the tensor has 3"):
        bmt_comm.check_shard(t)


# --- tier 2: on gloo ---------------------------------------------------------------------------

SHAPES = [(33, 7), (5,), (300,), (2, 3)]


def _protocol_and_its_readers() -> None:
    import bmt_comm
    from bmt_optim import AdamOptimizer, global_grad_norm
    from bmt_zero import DistributedParameter, FlatStorage

    comm = bmt_comm.get_context().comms.zero
    rank, world = comm.rank, comm.size
    gen = torch.Generator().manual_seed(7)
    fulls = [torch.randn(s, generator=gen) for s in SHAPES]
    params = [DistributedParameter(f) for f in fulls]
    for p, f in zip(params, fulls, strict=True):  # on its own: this rank's piece over the zero group
        assert isinstance(p, bmt_comm.Shard) and bmt_comm.check_shard(p) is p
        assert p.shard_comm is comm and p.whole_numel == f.numel()
        assert (p.shard_start, p.shard_end) == (p._start_partition, p._end_partition)
        assert torch.equal(p.detach(), f.reshape(-1)[p.shard_start : p.shard_end])

    storage = FlatStorage([(f"p{i}", p) for i, p in enumerate(params)], lambda p: comm)
    (buf,) = storage.buffers
    flat = buf.shard
    assert isinstance(flat, bmt_comm.Shard) and bmt_comm.check_shard(flat) is flat
    assert flat.shard_comm is comm and flat.whole_numel == buf.layout.total
    assert (flat.shard_start, flat.shard_end) == buf.layout.partition(rank)
    for p, f in zip(params, fulls, strict=True):  # now a view of the flat shard, the ranges moved
        assert bmt_comm.check_shard(p) is p and p.shard_comm is comm
        assert torch.equal(p.detach(), f.reshape(-1)[p.shard_start : p.shard_end])

    # the whole flat gradient, the same on every rank; each rank holds its piece of it
    whole_grad = torch.randn(buf.layout.total, generator=gen)
    flat.grad = whole_grad[flat.shard_start : flat.shard_end].clone()
    for norm_type in (2.0, 1.0, "inf"):
        want = torch.linalg.vector_norm(whole_grad, float(norm_type))
        got = global_grad_norm([flat], norm_type)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=0, msg=lambda s, p=norm_type: f"p={p}: {s}")

    opt = AdamOptimizer([flat], lr=0.0, betas=(0.5, 0.999))
    opt.step()
    sd = opt.state_dict(gather=True)
    if rank == 0:  # the whole first moment: (1 - beta1) * the whole gradient
        torch.testing.assert_close(sd["state"][0]["exp_avg"], 0.5 * whole_grad, rtol=0, atol=0)
    else:
        assert sd["state"] == {}, world


@pytest.mark.parametrize("world_size", [1, 2])
def test_parameters_and_flat_tensors_are_shards(spawn, world_size):
    spawn(_protocol_and_its_readers)
