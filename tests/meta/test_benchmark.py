"""bmtrain.benchmark runs on gloo and reports one measurement per size."""

from __future__ import annotations

from typing import Any

import pytest


def _run_benchmarks() -> list[tuple[str, int, bool]]:
    import bmtrain.benchmark as bench

    sizes = [1 << 10, 1 << 14]
    results = bench.all_gather(sizes=sizes, iters=2) + bench.reduce_scatter(sizes=sizes, iters=2)
    results += bench.send_recv(sizes=sizes, iters=2)
    return [(m.op, m.size_bytes, m.seconds > 0 and m.algbw_gbps > 0) for m in results]


@pytest.mark.world_size(2)
def test_benchmarks_measure_every_size(spawn: Any) -> None:
    per_rank = spawn(_run_benchmarks)
    assert per_rank[0] == per_rank[1]
    ops = [(op, size) for op, size, _ in per_rank[0]]
    assert ops == [(op, s) for op in ("all_gather", "reduce_scatter", "send_recv") for s in (1 << 10, 1 << 14)]
    assert all(ok for _, _, ok in per_rank[0])
