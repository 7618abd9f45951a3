"""The reference's helpers: printing (section 18), AverageRecorder, sum_loss, gather_result,
object collectives, synchronize, wait_loader."""

from __future__ import annotations

import contextlib
import io
import re

import bmt_comm
import pytest
import torch
from bmt_comm import AverageRecorder, print_block, print_dict, round_up


def _printed(fn, *args, **kwargs) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        fn(*args, **kwargs)
    return buf.getvalue()


def test_print_block_is_60_wide():
    buf = io.StringIO()
    print_block("Init", "body line", file=buf)
    assert buf.getvalue() == "=" * 27 + " Init " + "=" * 27 + "\nbody line\n"
    buf = io.StringIO()
    print_block("odd", file=buf)
    assert buf.getvalue() == "=" * 27 + " odd " + "=" * 28 + "\n"
    assert all(len(line) == 60 for line in _printed(print_block, "a title of some length").splitlines())


def test_print_dict_columns_and_wrapping():
    buf = io.StringIO()
    # longest key 10 -> key column round_up(13, 4) = 16, values wrapped at 60 - 16 = 44
    print_dict("Config", {"rank": 0, "world_size": 2, "long": "x" * 100, "empty": ""}, file=buf)
    assert buf.getvalue().splitlines() == [
        "=" * 26 + " Config " + "=" * 26,
        "rank :          0",
        "world_size :    2",
        "long :          " + "x" * 44,
        " " * 16 + "x" * 44,
        " " * 16 + "x" * 12,
        "empty :         ",
    ]
    buf = io.StringIO()
    print_dict("T", {"abcde": 1.5}, file=buf)  # round_up(5 + 3, 4) = 8
    assert buf.getvalue().splitlines()[1] == "abcde : 1.5"


def test_round_up():
    assert [round_up(x, 4) for x in (0, 1, 4, 5, 8, 9)] == [0, 4, 4, 8, 8, 12]


def test_average_recorder():
    rec = AverageRecorder(alpha=0.9, start_value=5)
    assert rec.value == 5  # raw start value before any record
    rec = AverageRecorder()
    assert rec.value == 0
    rec.record(10)
    assert rec.value == pytest.approx(10)  # bias corrected: 1.0 / (1 - 0.9)
    rec.record(20)
    assert rec.value == pytest.approx((0.9 * 1.0 + 0.1 * 20) / (1 - 0.81))
    half = AverageRecorder(alpha=0.5)
    for v in (4, 8, 16):
        half.record(v)
    assert half.value == pytest.approx((0.5 * (0.5 * 2 + 4) + 8) / (1 - 0.125))


def test_stream_helpers_are_no_ops_on_cpu():
    t = torch.ones(2)
    with bmt_comm.stream_context(None):
        t.add_(1)
    bmt_comm.wait_stream(None, None)
    bmt_comm.record_stream(t, None)
    assert bmt_comm.current_stream(torch.device("cpu")) is None and t.tolist() == [2.0, 2.0]


def test_print_rank_before_init():
    assert not bmt_comm.is_initialized()
    assert _printed(bmt_comm.print_rank, "a", 1, sep="-") == "a-1\n"
    assert _printed(bmt_comm.print_rank, "a", rank=1) == ""


def _check_utils() -> None:
    ctx = bmt_comm.get_context()
    n, r = ctx.world_size, ctx.rank
    tp = ctx.comms.tp

    # print_rank: only the named global rank prints (rank 0 by default)
    assert _printed(bmt_comm.print_rank, "hello", r) == ("hello 0\n" if r == 0 else "")
    assert _printed(bmt_comm.print_rank, "last", rank=n - 1, end="!") == ("last!" if r == n - 1 else "")
    memory = _printed(bmt_comm.see_memory, "after step")
    assert ("after step" in memory) == (r == 0) and (memory == "") == (r != 0)

    # sum_loss is the mean over ranks, differentiable as 1.0.1's (d mean / d loss_r = 1/n)
    leaf = torch.tensor(1.5 + r, requires_grad=True)
    loss = leaf * 1
    mean = bmt_comm.sum_loss(loss)
    assert mean.item() == 1.5 + (n - 1) / 2 and mean.requires_grad
    assert loss.item() == 1.5 + r
    mean.backward()
    assert leaf.grad is not None and leaf.grad.item() == 1 / n
    assert bmt_comm.sum_loss(torch.tensor([2.0 * r]), tp).item() == 2.0 * sum(tp.global_ranks) / tp.size

    # gather_result: concatenation on dim 0, CPU in -> CPU out, any layout
    rows = torch.arange(6.0).view(3, 2) + 10 * r
    got = bmt_comm.gather_result(rows)
    assert got.device.type == "cpu" and not got.requires_grad
    assert torch.equal(got, torch.cat([torch.arange(6.0).view(3, 2) + 10 * k for k in range(n)]))
    cols = (torch.arange(6).view(2, 3) + 10 * r).t()  # non-contiguous int64
    assert torch.equal(bmt_comm.gather_result(cols), torch.cat([(torch.arange(6).view(2, 3) + 10 * k).t() for k in range(n)]))
    assert torch.equal(bmt_comm.gather_result(torch.tensor(float(r))), torch.arange(float(n)))
    assert torch.equal(bmt_comm.gather_result(torch.tensor([r]), tp), torch.tensor(tp.global_ranks))
    if n > 1:
        shapes = [(2,)] + [(3,)] * (n - 1)
        with pytest.raises(ValueError, match=re.escape(f"same shape on every rank, got shapes by rank {shapes}")):
            bmt_comm.gather_result(torch.zeros(2 if r == 0 else 3))

    # objects: any picklable value, from any source rank, over the world or a sub-group
    payload = {"rank": r, "tensor": torch.arange(3) * r, "text": "é" * r}
    got_obj = bmt_comm.broadcast_object(payload, src=n - 1)
    assert got_obj["rank"] == n - 1 and torch.equal(got_obj["tensor"], torch.arange(3) * (n - 1))
    assert bmt_comm.broadcast_object(r, tp, src=tp.size - 1) == tp.global_ranks[-1]
    assert bmt_comm.allgather_objects((r, "x" * r)) == [(k, "x" * k) for k in range(n)]
    assert bmt_comm.allgather_objects(r, ctx.comms.tp_zero) == list(ctx.comms.tp_zero.global_ranks)
    with pytest.raises(ValueError, match=rf"src \({n}\) must be a rank in \[0, {n}\) of this group"):
        bmt_comm.broadcast_object(1, src=n)

    # synchronize is a barrier over a group; wait_loader does nothing on CPU
    bmt_comm.synchronize()
    bmt_comm.synchronize(tp)
    assert bmt_comm.wait_loader() is None
    assert bmt_comm.rank() == r and bmt_comm.world_size() == n


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_utils_distributed(spawn, world_size):
    spawn(_check_utils, tp_size=2 if world_size > 1 else 1)
