"""Building a ~1 GB model from shapes at world size 4 keeps each rank near a quarter of it."""

from __future__ import annotations

import pytest
import torch

N_PARAMS = 16
ROWS, COLS = 4096, 4096  # 16 x 64 MiB fp32 = 1 GiB
MIB = 1024 * 1024


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _build_and_init() -> dict[str, float]:
    import bmt_comm
    from bmt_zero import (
        DistributedModule,
        DistributedParameter,
        ParameterInitializer,
        gather_full,
        init_parameters,
    )

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS mark (VmHWM) to the current RSS
    base = _status_kib("VmRSS")

    model = DistributedModule()
    # a fill touches every page of the full tensor as a random init would, at a fraction of the cost
    init = ParameterInitializer(torch.nn.init.constant_, val=0.5)
    for i in range(N_PARAMS):
        model.register_parameter(f"w{i}", DistributedParameter((ROWS, COLS), init_method=init))
    init_parameters(model)

    peak = (_status_kib("VmHWM") - base) / 1024
    shard = sum(p.numel() * p.element_size() for p in model.parameters()) / MIB
    w0 = model._parameters["w0"]
    assert bool((w0.detach() == 0.5).all())  # initialised, not zeros
    del model
    full = gather_full(DistributedParameter((5,), init_method=init))  # the group still works
    assert full is not None and bmt_comm.world_size() == 4
    return {"peak_mib": peak, "shard_mib": shard}


@pytest.mark.world_size(4)
def test_build_from_shapes_keeps_a_quarter(spawn):
    largest = ROWS * COLS * 4 / MIB
    for rank, r in enumerate(spawn(_build_and_init)):
        assert r["shard_mib"] == pytest.approx(N_PARAMS * largest / 4)
        budget = r["shard_mib"] + largest + 150  # shards + one full parameter at a time + slack
        assert r["peak_mib"] < budget, f"rank {rank}: peak {r['peak_mib']:.0f} MiB > budget {budget:.0f} MiB"
        assert r["peak_mib"] > r["shard_mib"] * 0.9  # the measurement sees the shards
