"""Flat sharded storage: layout arithmetic, and (on gloo) build, gather, release, gradients."""

from __future__ import annotations

import pytest
import torch
from bmt_zero.flat_storage import ALIGN_BYTES, BufferKey, FlatSlot, plan_layout

# --- tier 1: layout arithmetic, no process group -------------------------------------------


def test_key_names_follow_the_reference():
    assert BufferKey(torch.float16, True, None).name == "float16_grad"
    assert BufferKey(torch.float32, False, "embed").name == "float32_nograd_g_embed"
    assert BufferKey(torch.bfloat16, True, "tp", tp_mode=True).name == "bfloat16_grad_g_tp"
    assert BufferKey(torch.float32, True, None, tp_mode=True).name == "float32_grad_tp"


def test_offsets_are_512_byte_aligned_and_total_splits_evenly():
    key = BufferKey(torch.float32, True, None)
    shapes = [("a", torch.Size([3, 5])), ("b", torch.Size([200])), ("c", torch.Size([0])), ("d", torch.Size([7]))]
    for world in (1, 2, 3, 4):
        layout = plan_layout(key, shapes, world)
        align = ALIGN_BYTES // 4
        assert [s.offset for s in layout.slots] == [0, 128, 384, 384]
        assert all(s.offset % align == 0 for s in layout.slots)
        assert layout.total % (world * align) == 0 and layout.total >= 384 + 7
        assert layout.total < 384 + 7 + world * align
        assert layout.partition_numel * world == layout.total
    half = plan_layout(BufferKey(torch.float16, True, None), shapes, 2)
    assert [s.offset for s in half.slots] == [0, 256, 512, 512]


def test_empty_layout_and_bad_world():
    assert plan_layout(BufferKey(torch.float32, True, None), [], 4).total == 0
    with pytest.raises(ValueError, match="world size must be >= 1, got 0"):
        plan_layout(BufferKey(torch.float32, True, None), [], 0)
    with pytest.raises(ValueError, match=r"rank \(4\) must be in \[0, 4\)"):
        plan_layout(BufferKey(torch.float32, True, None), [("a", torch.Size([9]))], 4).partition(4)


def test_local_range_covers_each_element_once():
    slot = FlatSlot("w", torch.Size([10, 3]), offset=128)
    for world, part in ((1, 512), (2, 256), (4, 128), (8, 32)):
        pieces = [slot.local_range(r * part, (r + 1) * part) for r in range(world)]
        covered = [i for lo, hi in pieces for i in range(lo, hi)]
        assert covered == list(range(30)), (world, pieces)
        assert all(0 <= lo <= hi <= 30 for lo, hi in pieces)


# --- tier 2: on gloo ------------------------------------------------------------------------

SHAPES = [((33, 7), torch.float32, True, None), ((5,), torch.float32, False, None), ((300,), torch.float32, True, None),
          ((4, 4), torch.float64, True, None), ((129,), torch.float32, True, "emb"), ((2, 3), torch.float32, True, None)]


def _make_params(tp_mode: bool = False):
    from bmt_zero import DistributedParameter

    gen = torch.Generator().manual_seed(1234)
    fulls, params = [], []
    for shape, dtype, rg, group in SHAPES:
        full = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
        fulls.append(full)
        params.append(DistributedParameter(full, requires_grad=rg, group=group, tp_mode=tp_mode))
    return fulls, params


def _check_build_gather_grads(chunk: int | None) -> None:
    import bmt_comm
    from bmt_zero import DistributedParameter
    from bmt_zero.flat_storage import BufferState, FlatStorage

    ctx = bmt_comm.get_context()
    comm = ctx.comms.zero
    rank, world = comm.rank, comm.size
    fulls, params = _make_params()
    names = [f"p{i}" for i in range(len(params))]
    storage = FlatStorage(list(zip(names, params, strict=True)), lambda p: comm, build_chunk_numel=chunk)

    keys = [b.layout.key.name for b in storage.buffers]
    assert keys == ["float32_grad", "float32_nograd", "float64_grad", "float32_grad_g_emb"], keys
    assert [(g, len(ps)) for g, ps in storage.grouped_parameters()] == [(None, 3), ("emb", 1)]
    assert all(not b.shard.requires_grad for b in storage.buffers if not b.layout.key.requires_grad)

    # the shard holds exactly this rank's partition of the flat layout; params are views of it
    for buf in storage.buffers:
        expect = torch.zeros(buf.layout.total, dtype=buf.layout.key.dtype)
        for slot, p in zip(buf.layout.slots, buf.params, strict=True):
            i = next(j for j, q in enumerate(params) if q is p)
            expect[slot.offset : slot.offset + slot.numel] = fulls[i].reshape(-1)
        lo, hi = buf.layout.partition(rank)
        assert torch.equal(buf.shard.detach(), expect[lo:hi])
        for p in buf.params:
            assert p._in_block and p.dim() == 1 and p.numel() == p._end_partition - p._start_partition
            assert p.numel() == 0 or p.untyped_storage().data_ptr() == buf.shard.untyped_storage().data_ptr()
    # pieces held by consecutive ranks are contiguous and in rank order
    ranges = bmt_comm.allgather_objects([(p._start_partition, p._end_partition) for p in params])
    for i, full in enumerate(fulls):
        pieces = [r[i] for r in ranges if r[i][0] < r[i][1]]
        assert pieces[0][0] == 0 and pieces[-1][1] == full.numel()
        assert all(a[1] == b[0] for a, b in zip(pieces, pieces[1:], strict=False))

    # gather: params become the full tensors; release frees the memory. A group of one is in
    # place: its shard is the full buffer, always gathered, and release has nothing to free
    in_place = world == 1
    assert all(b.in_place is in_place for b in storage.buffers)
    assert storage.state is (BufferState.GATHERED if in_place else BufferState.RELEASED)
    storage.gather_async()
    storage.wait()
    storage.bind_full()
    for p, full in zip(params, fulls, strict=True):
        assert p.shape == full.shape and torch.equal(p.detach(), full)
    for name, full in zip(names, fulls, strict=True):
        assert torch.equal(storage.full_tensor(name), full)
    storage.bind_shard()
    storage.release()
    if in_place:
        assert all(b._full.untyped_storage().data_ptr() == b.shard.untyped_storage().data_ptr() for b in storage.buffers)
        assert storage.state is BufferState.GATHERED and torch.equal(storage.full_tensor("p0"), fulls[0])
    else:
        assert all(b._full.untyped_storage().nbytes() == 0 for b in storage.buffers)
        with pytest.raises(RuntimeError, match="is released, not gathered"):
            storage.full_tensor("p0")

    # gradients: the full gradient of rank r is (r + 1) * g, so the sum is g * world(world+1)/2
    def backward_once(scale: float) -> None:
        storage.gather_async()
        storage.wait()
        grads = storage.new_full_grads()
        assert [g is None for g in grads] == [False, True, False, False]
        if in_place:  # autograd accumulates straight into the shards' gradients
            assert all(g is b.shard.grad for g, b in zip(grads, storage.buffers, strict=True) if g is not None)
        storage.bind_full(grads)
        loss = sum(((p.double() ** 2).sum() * (rank + 1) * scale) for p in params if p.requires_grad)
        loss.backward()
        storage.bind_shard()
        storage.reduce_scatter_grads(grads)
        storage.release()

    tri = world * (world + 1) / 2

    def expect_grad(i: int, factor: float) -> torch.Tensor:
        p = params[i]
        return (2 * fulls[i] * tri * factor).reshape(-1)[p._start_partition : p._end_partition].to(p.dtype)

    backward_once(1.0)
    backward_once(0.5)  # accumulates
    for i, p in enumerate(params):
        if not p.requires_grad:
            assert p.grad is None
            continue
        torch.testing.assert_close(p.grad, expect_grad(i, 1.5), rtol=1e-6, atol=1e-6)
    # a param whose grad was set to None starts again from zero; the others keep accumulating
    params[0].grad = None
    backward_once(1.0)
    torch.testing.assert_close(params[0].grad, expect_grad(0, 1.0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(params[2].grad, expect_grad(2, 2.5), rtol=1e-6, atol=1e-6)
    flat = storage.buffers[0].shard
    assert params[2].grad.untyped_storage().data_ptr() == flat.grad.untyped_storage().data_ptr()
    # zeroing the flat parameter's grad restarts everything in it
    storage.zero_grad(set_to_none=True)
    assert flat.grad is None and params[0].grad is None
    backward_once(1.0)
    torch.testing.assert_close(params[2].grad, expect_grad(2, 1.0), rtol=1e-6, atol=1e-6)
    storage.zero_grad(set_to_none=False)
    assert torch.count_nonzero(flat.grad) == 0 and torch.count_nonzero(params[2].grad) == 0

    # load_full keeps the local part; a wrong shape names the param and both shapes
    new = torch.arange(33 * 7, dtype=torch.float32).view(33, 7)
    storage.load_full("p0", new)
    storage.gather_async()
    storage.wait()
    assert torch.equal(storage.full_tensor("p0"), new)
    storage.release()
    with pytest.raises(ValueError, match=r"'p0' has shape \(33, 7\), got a tensor of shape \(7, 33\)"):
        storage.load_full("p0", new.t())
    with pytest.raises(ValueError, match="'p0' already lives in another flat storage"):
        FlatStorage([("p0", params[0])], lambda p: comm)
    with pytest.raises(TypeError, match="'x' is Parameter"):
        FlatStorage([("x", torch.nn.Parameter(torch.zeros(2)))], lambda p: comm)
    empty = FlatStorage([("e", DistributedParameter(torch.zeros(0)))], lambda p: comm)
    empty.gather_async()
    empty.wait()
    assert empty.state is BufferState.GATHERED


def _build_gather_grads() -> None:
    _check_build_gather_grads(chunk=None)
    _check_build_gather_grads(chunk=5)  # the build's reduce-scatter in many small chunks


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_build_gather_release_and_gradients(spawn, world_size):
    spawn(_build_gather_grads)


def _other_group_build() -> None:
    """Params sharded over tp_zero (2 ranks) moved into a storage over the zero group (4 ranks)."""
    import bmt_comm
    from bmt_zero.flat_storage import FlatStorage

    comms = bmt_comm.get_context().comms
    assert comms.zero.size == 4 and comms.tp_zero.size == 2
    fulls, params = _make_params(tp_mode=True)
    assert all(p._zero_comm is comms.tp_zero for p in params)
    storage = FlatStorage([(f"p{i}", p) for i, p in enumerate(params)], lambda p: comms.zero)
    assert all(b.comm is comms.zero for b in storage.buffers)
    assert all(p._zero_comm is comms.zero for p in params)  # where gather_full finds the pieces now
    storage.gather_async()
    storage.wait()
    for i, full in enumerate(fulls):
        assert torch.equal(storage.full_tensor(f"p{i}"), full)
    storage.release()


@pytest.mark.world_size(4)
def test_build_from_shards_of_another_group(spawn):
    spawn(_other_group_build, tp_size=2)
