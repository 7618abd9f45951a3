"""Rank layout: every named index of the reference (section 2) and every group's members.

Expected tables are written out by hand from the reference's formulas, not recomputed with them.
"""

from __future__ import annotations

import pytest
from bmt_comm import GroupKind, Topology

# name -> value per rank, for the named indices of BMTrain's ``topology``
W8_PIPE2_TP2 = {
    "stage_id": [0, 0, 0, 0, 1, 1, 1, 1],
    "pipe_idx": [0, 1, 2, 3, 0, 1, 2, 3],
    "tp_id": [0, 1, 0, 1, 0, 1, 0, 1],
    "tp_idx": [0, 0, 1, 1, 2, 2, 3, 3],
    "pp_zero_idx": [0, 0, 0, 0, 1, 1, 1, 1],
    "pp_zero_id": [0, 1, 2, 3, 0, 1, 2, 3],
    "tp_zero_idx": [0, 1, 0, 1, 0, 1, 0, 1],
    "tp_zero_id": [0, 0, 1, 1, 2, 2, 3, 3],
    "pp_tp_zero_idx": [0, 1, 0, 1, 2, 3, 2, 3],
    "pp_tp_zero_id": [0, 0, 1, 1, 0, 0, 1, 1],
    "zero_idx": [0] * 8,
    "zero_id": [0, 1, 2, 3, 4, 5, 6, 7],
    "stages": [2] * 8,
}
W8_PIPE2_TP2_GROUPS = {
    GroupKind.WORLD: [(0, 1, 2, 3, 4, 5, 6, 7)],
    GroupKind.ZERO: [(0, 1, 2, 3, 4, 5, 6, 7)],
    GroupKind.TP: [(0, 1), (2, 3), (4, 5), (6, 7)],
    GroupKind.TP_ZERO: [(0, 2, 4, 6), (1, 3, 5, 7)],
    GroupKind.PIPE: [(0, 4), (1, 5), (2, 6), (3, 7)],
    GroupKind.PP_ZERO: [(0, 1, 2, 3), (4, 5, 6, 7)],
    GroupKind.PP_TP_ZERO: [(0, 2), (1, 3), (4, 6), (5, 7)],
}

W4_TP2 = {
    "stage_id": [0, 0, 0, 0],
    "pipe_idx": [0, 1, 2, 3],
    "tp_id": [0, 1, 0, 1],
    "tp_idx": [0, 0, 1, 1],
    "pp_zero_idx": [0, 0, 0, 0],
    "pp_zero_id": [0, 1, 2, 3],
    "tp_zero_idx": [0, 1, 0, 1],
    "tp_zero_id": [0, 0, 1, 1],
    "pp_tp_zero_idx": [0, 1, 0, 1],
    "pp_tp_zero_id": [0, 0, 1, 1],
    "zero_idx": [0] * 4,
    "zero_id": [0, 1, 2, 3],
    "stages": [1] * 4,
}
W4_TP2_GROUPS = {
    GroupKind.WORLD: [(0, 1, 2, 3)],
    GroupKind.ZERO: [(0, 1, 2, 3)],
    GroupKind.TP: [(0, 1), (2, 3)],
    GroupKind.TP_ZERO: [(0, 2), (1, 3)],
    GroupKind.PIPE: [(0,), (1,), (2,), (3,)],
    GroupKind.PP_ZERO: [(0, 1, 2, 3)],
    GroupKind.PP_TP_ZERO: [(0, 2), (1, 3)],
}

W4_PIPE4 = {
    "stage_id": [0, 1, 2, 3],
    "pipe_idx": [0, 0, 0, 0],
    "tp_id": [0, 0, 0, 0],
    "tp_idx": [0, 1, 2, 3],
    "pp_zero_idx": [0, 1, 2, 3],
    "pp_zero_id": [0, 0, 0, 0],
    "tp_zero_idx": [0, 0, 0, 0],
    "tp_zero_id": [0, 1, 2, 3],
    "pp_tp_zero_idx": [0, 1, 2, 3],
    "pp_tp_zero_id": [0, 0, 0, 0],
    "zero_idx": [0] * 4,
    "zero_id": [0, 1, 2, 3],
    "stages": [4] * 4,
}
W4_PIPE4_GROUPS = {
    GroupKind.WORLD: [(0, 1, 2, 3)],
    GroupKind.ZERO: [(0, 1, 2, 3)],
    GroupKind.TP: [(0,), (1,), (2,), (3,)],
    GroupKind.TP_ZERO: [(0, 1, 2, 3)],
    GroupKind.PIPE: [(0, 1, 2, 3)],
    GroupKind.PP_ZERO: [(0,), (1,), (2,), (3,)],
    GroupKind.PP_TP_ZERO: [(0,), (1,), (2,), (3,)],
}

W6_PIPE3_TP2 = {
    "stage_id": [0, 0, 1, 1, 2, 2],
    "pipe_idx": [0, 1, 0, 1, 0, 1],
    "tp_id": [0, 1, 0, 1, 0, 1],
    "tp_idx": [0, 0, 1, 1, 2, 2],
    "pp_zero_idx": [0, 0, 1, 1, 2, 2],
    "pp_zero_id": [0, 1, 0, 1, 0, 1],
    "tp_zero_idx": [0, 1, 0, 1, 0, 1],
    "tp_zero_id": [0, 0, 1, 1, 2, 2],
    "pp_tp_zero_idx": [0, 1, 2, 3, 4, 5],
    "pp_tp_zero_id": [0, 0, 0, 0, 0, 0],
    "zero_idx": [0] * 6,
    "zero_id": [0, 1, 2, 3, 4, 5],
    "stages": [3] * 6,
}
W6_PIPE3_TP2_GROUPS = {
    GroupKind.WORLD: [(0, 1, 2, 3, 4, 5)],
    GroupKind.ZERO: [(0, 1, 2, 3, 4, 5)],
    GroupKind.TP: [(0, 1), (2, 3), (4, 5)],
    GroupKind.TP_ZERO: [(0, 2, 4), (1, 3, 5)],
    GroupKind.PIPE: [(0, 2, 4), (1, 3, 5)],
    GroupKind.PP_ZERO: [(0, 1), (2, 3), (4, 5)],
    GroupKind.PP_TP_ZERO: [(0,), (1,), (2,), (3,), (4,), (5,)],
}

LAYOUTS = [
    pytest.param(8, 2, 2, W8_PIPE2_TP2, W8_PIPE2_TP2_GROUPS, id="w8-pipe2-tp2"),
    pytest.param(4, 1, 2, W4_TP2, W4_TP2_GROUPS, id="w4-tp2"),
    pytest.param(4, 4, 1, W4_PIPE4, W4_PIPE4_GROUPS, id="w4-pipe4"),
    pytest.param(6, 3, 2, W6_PIPE3_TP2, W6_PIPE3_TP2_GROUPS, id="w6-pipe3-tp2"),
]

# which named (group index, rank in group) pair locates a rank in each kind's groups
KIND_INDICES = {
    GroupKind.TP: ("tp_idx", "tp_id"),
    GroupKind.TP_ZERO: ("tp_zero_idx", "tp_zero_id"),
    GroupKind.PIPE: ("pipe_idx", "stage_id"),
    GroupKind.PP_ZERO: ("pp_zero_idx", "pp_zero_id"),
    GroupKind.PP_TP_ZERO: ("pp_tp_zero_idx", "pp_tp_zero_id"),
    GroupKind.ZERO: ("zero_idx", "zero_id"),
}


@pytest.mark.parametrize("world, pipe, tp, indices, groups", LAYOUTS)
def test_named_indices_and_groups(world, pipe, tp, indices, groups):
    for rank in range(world):
        topo = Topology(rank=rank, world_size=world, pipe_size=pipe, tp_size=tp)
        got = {name: getattr(topo, name) for name in indices}
        assert got == {name: values[rank] for name, values in indices.items()}, f"rank {rank}"
        assert topo.stage_size == world // pipe
        for kind, expected_groups in groups.items():
            assert topo.all_groups(kind) == expected_groups, kind
            mine = [g for g in expected_groups if rank in g]
            assert topo.group_ranks(kind) == mine[0], (rank, kind)
            assert topo.rank_in_group(kind) == mine[0].index(rank), (rank, kind)
        for kind, (idx_name, pos_name) in KIND_INDICES.items():
            # the reference's (group index, position) name this rank's slot in that kind's groups
            assert groups[kind][got[idx_name]][got[pos_name]] == rank, (rank, kind)
        # the reference's accessors: pipe/zero/tp_zero/tp only, others None
        assert topo.get_group_id("pipe") == got["pipe_idx"]
        assert topo.get_group_id("zero") == 0
        assert topo.get_group_id("tp_zero") == got["tp_zero_idx"]
        assert topo.get_group_id("tp") == got["tp_idx"]
        assert topo.get_group_rank("pipe") == got["stage_id"]
        assert topo.get_group_rank("zero") == rank
        assert topo.get_group_rank("tp_zero") == got["tp_zero_id"]
        assert topo.get_group_rank("tp") == got["tp_id"]
        assert topo.get_group_id("pp_zero") is None and topo.get_group_rank("bogus") is None


def test_groups_partition_the_world():
    for world, pipe, tp in [(8, 2, 2), (12, 3, 2), (16, 2, 4), (1, 1, 1)]:
        topo = Topology(rank=0, world_size=world, pipe_size=pipe, tp_size=tp)
        for kind in GroupKind:
            members = sorted(r for g in topo.all_groups(kind) for r in g)
            assert members == list(range(world)), (world, pipe, tp, kind)


def test_world_not_divisible_names_all_three_numbers():
    with pytest.raises(ValueError, match=r"world_size \(10\).*pipe_size \(3\).*tp_size \(2\)"):
        Topology(rank=0, world_size=10, pipe_size=3, tp_size=2)
    with pytest.raises(ValueError, match=r"world_size \(6\).*pipe_size \(4\).*tp_size \(1\)"):
        Topology(rank=0, world_size=6, pipe_size=4, tp_size=1)


def test_bad_rank_and_sizes():
    with pytest.raises(ValueError, match=r"rank \(4\) must be in \[0, world_size=4\)"):
        Topology(rank=4, world_size=4)
    with pytest.raises(ValueError, match=r"pipe_size \(0\)"):
        Topology(rank=0, world_size=4, pipe_size=0)
    with pytest.raises(ValueError, match=r"world_size must be >= 1, got 0"):
        Topology(rank=0, world_size=0)


# --- multi-process: the communicators built by init_distributed -------------------------------

EXPECTED_W4_PIPE2_TP2 = {  # kind -> members of rank r's group, by rank
    "world": [(0, 1, 2, 3)] * 4,
    "zero": [(0, 1, 2, 3)] * 4,
    "tp": [(0, 1), (0, 1), (2, 3), (2, 3)],
    "tp_zero": [(0, 2), (1, 3), (0, 2), (1, 3)],
    "pipe": [(0, 2), (1, 3), (0, 2), (1, 3)],
    "pp_zero": [(0, 1), (0, 1), (2, 3), (2, 3)],
    "pp_tp_zero": [(0,), (1,), (2,), (3,)],
}


def _check_comms_w4_pipe2_tp2() -> None:
    import bmt_comm
    import torch

    ctx = bmt_comm.get_context()
    r = ctx.rank
    for kind in GroupKind:
        comm = ctx.comms.get(kind)
        members = EXPECTED_W4_PIPE2_TP2[kind.value][r]
        assert comm.global_ranks == members, (kind, comm)
        assert comm.size == len(members) and comm.rank == members.index(r), (kind, comm)
        assert comm.device == torch.device("cpu")
        # each rank adds its own bit: the sum is exactly the bitmask of the members
        t = torch.tensor([1 << r], dtype=torch.int64)
        comm.all_reduce(t, "sum")
        assert t.item() == sum(1 << m for m in members), (kind, t.item())
    # point-to-point inside a sub-group uses group ranks: pipe groups are (0, 2) and (1, 3)
    pipe = ctx.comms.pipe
    peer = 1 - pipe.rank
    got = torch.empty(3, dtype=torch.int64)
    with pipe.group():
        pipe.send(torch.full((3,), r), peer)
        pipe.recv(got, peer)
    assert got.tolist() == [pipe.global_ranks[peer]] * 3
    if pipe.rank == 0:  # stage 0 hands activations to stage 1, as the pipeline does
        bmt_comm.send_activations(torch.arange(6.0).view(2, 3) + r, 1, pipe)
    else:
        act = bmt_comm.recv_activations(0, pipe)
        assert torch.equal(act, torch.arange(6.0).view(2, 3) + pipe.global_ranks[0])
    # differentiable ops take a sub-communicator too
    x = torch.tensor([float(r)], requires_grad=True)
    y = bmt_comm.all_reduce(x, "sum", ctx.comms.tp_zero)
    assert y.item() == sum(ctx.comms.tp_zero.global_ranks)
    assert bmt_comm.all_gather(x, ctx.comms.tp).view(-1).tolist() == [float(m) for m in ctx.comms.tp.global_ranks]
    # same members -> one shared object (one process group, not two)
    assert ctx.comms.tp is ctx.comms.pp_zero and ctx.comms.tp_zero is ctx.comms.pipe
    assert ctx.comms.world is ctx.comms.zero
    # the reference's config keys agree with the topology
    cfg = bmt_comm.config
    assert (cfg["pipe_size"], cfg["tp_size"], cfg["pipe_enabled"], cfg["micros"]) == (2, 2, True, 2)
    assert cfg["tp_rank"] == r % 2 and cfg["tp_zero_rank"] == r // 2 and cfg["tp_zero_size"] == 1
    assert cfg["zero_size"] == 2 and cfg["zero_rank"] == r
    assert cfg["tp_comm"] is ctx.comms.tp and cfg["pipe_comm"] is ctx.comms.pipe
    assert cfg["topology"].stage_id == r // 2


@pytest.mark.world_size(4)
def test_communicators_world4_pipe2_tp2(spawn):
    spawn(_check_comms_w4_pipe2_tp2, pipe_size=2, tp_size=2)
