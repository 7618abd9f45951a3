"""Ranks that disagree on a flat storage (a Block's parameters) get one clear error on every rank,
before any collective of the build, instead of a transport crash, a hang or silently wrong shards."""

from __future__ import annotations

import re

import pytest
import torch

from ..harness import DistributedTestError


def _storage_of(case: str) -> list[str]:
    """Build a storage whose description differs on rank 1 as ``case`` says; return each rank's error."""
    import bmt_comm
    from bmt_zero.flat_storage import FlatStorage
    from bmt_zero.parameter import DistributedParameter

    comm = bmt_comm.get_context().comms.zero
    rank = comm.rank
    shapes = {"a": (4, 3), "b": (5,)}
    dtype = torch.float32
    if rank == 1:
        if case == "shape":
            shapes["b"] = (6,)
        elif case == "dtype":
            dtype = torch.float64
        elif case == "count":
            shapes["c"] = (2,)
        elif case == "name":
            shapes = {"a": (4, 3), "z": (5,)}
    params = [(n, DistributedParameter(torch.ones(s, dtype=dtype))) for n, s in shapes.items()]
    try:
        FlatStorage(params, lambda p: comm, what="the test storage")
    except ValueError as exc:
        return [str(exc)]
    return []


_EXPECTED = {
    "shape": r"differ at entry 2: 'b: shape \(5,\), tp_split_dim -1' vs 'b: shape \(6,\), tp_split_dim -1'",
    "dtype": r"differ at entry 0: 'buffer float32_grad over 2 ranks' vs 'buffer float64_grad over 2 ranks'",
    "count": r"differ at entry 3: <nothing> vs 'c: shape \(2,\), tp_split_dim -1' \(3 vs 4 entries\)",
    "name": r"differ at entry 2: 'b: shape \(5,\), tp_split_dim -1' vs 'z: shape \(5,\), tp_split_dim -1'",
}


@pytest.mark.world_size(2)
@pytest.mark.parametrize("case", list(_EXPECTED))
def test_disagreeing_ranks_all_raise_the_same_error(spawn, case):
    errors = spawn(_storage_of, case)
    assert errors[0] == errors[1] and len(errors[0]) == 1, errors
    assert errors[0][0].startswith(
        "the test storage must be built alike on every rank of its group (ranks [0, 1]), but rank 0 and rank 1"
    )
    assert re.search(_EXPECTED[case], errors[0][0]), errors[0][0]


def _agreeing() -> int:
    return len(_storage_of("same"))


@pytest.mark.world_size(2)
def test_agreeing_ranks_build(spawn):
    assert spawn(_agreeing) == [0, 0]


def _tp_subgroup(rank_off: int) -> list[str]:
    """world 4, tp 2: tensor-parallel params live over tp_zero ({0, 2} and {1, 3}). Local tp shapes
    may differ between the two tp_zero groups; within one they must agree. Rank ``rank_off`` (if
    any) breaks its own group."""
    import bmt_comm
    from bmt_ckpt import Block
    from bmt_zero.parameter import DistributedParameter

    ctx = bmt_comm.get_context()
    rank = ctx.rank
    width = 4 + ctx.topology.tp_id  # uneven local tp shapes, alike within each tp_zero group
    if rank == rank_off:
        width += 1

    class Layer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.shared = DistributedParameter(torch.ones(3))
            self.split = DistributedParameter(torch.ones(width, 2), tp_mode=True, tp_split_dim=0)

    try:
        Block(Layer())
    except ValueError as exc:
        return [str(exc)]
    return []


@pytest.mark.world_size(4)
def test_tensor_parallel_groups_agree_within_themselves(spawn):
    assert spawn(_tp_subgroup, -1, tp_size=2) == [[], [], [], []]
    errors = spawn(_tp_subgroup, 3, tp_size=2)
    mine = "Block(Layer) (buffer float32_grad_g_tp) must be built alike on every rank of its group (ranks [1, 3])"
    assert errors[1] == errors[3] and errors[1][0].startswith(mine), errors
    assert "'split: shape (5, 2), tp_split_dim 0' vs 'split: shape (6, 2), tp_split_dim 0'" in errors[1][0]
    # ranks 0 and 2 agreed among themselves, and learn of it instead of building on alone
    assert errors[0] == errors[2] == [
        "Block(Layer): the ranks of another subgroup of [0, 1, 2, 3] disagree (raised there)"
    ], errors


def _block_of(rank_shape: int) -> None:
    import bmt_comm
    from bmt_ckpt import Block
    from bmt_zero.nn import Linear

    rank = bmt_comm.get_context().rank
    Block(Linear(4, 4 + (rank == rank_shape)))


@pytest.mark.world_size(2)
def test_block_names_itself(spawn):
    with pytest.raises(DistributedTestError, match=r"ValueError: Block\(Linear\) must be built alike"):
        spawn(_block_of, 1)


def _layers_differ(n_by_rank: tuple[int, ...]) -> list[str]:
    import bmt_comm
    import bmt_zero
    from bmt_ckpt import TransformerBlockList

    n = n_by_rank[bmt_comm.get_context().rank]
    layers = [bmt_zero.make_distributed(torch.nn.Linear(4, 4)) for _ in range(n)]
    try:
        TransformerBlockList(layers)
    except ValueError as exc:
        return [str(exc)]
    return []


@pytest.mark.world_size(2)
@pytest.mark.parametrize("counts", [(3, 2), (2, 4)])
def test_ranks_with_different_layer_counts_raise_the_same_error(spawn, counts):
    errors = spawn(_layers_differ, counts)
    assert errors[0] == errors[1] and len(errors[0]) == 1, errors
    text = errors[0][0]
    short = min(counts)
    assert "are building different things at the same point" in text, text
    assert f"TransformerBlockList of {short} Blocks" in text and f"Block #{short + 1}: DistributedLinear" in text, text
    assert "differ in the number or order of Blocks" in text


class _Stack(torch.nn.Module):
    def __init__(self, n: int, extra: bool) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(n))
        self.head = torch.nn.Linear(4, 3 if not extra else 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def _wrapped_model_differs(n_by_rank: tuple[int, ...], head_differs: bool) -> list[str]:
    """A plain ModuleList of Blocks (the wrapper's), not a TransformerBlockList: the first forward
    checks the whole model, and meets a rank still building an extra Block."""
    import bmt_comm
    from bmt_ckpt import BMTrainModelWrapper

    rank = bmt_comm.get_context().rank
    try:
        model = BMTrainModelWrapper(_Stack(n_by_rank[rank], extra=head_differs and rank == 1))
        model(torch.ones(2, 4, device=bmt_comm.get_context().device)).sum().backward()
    except ValueError as exc:
        return [str(exc)]
    return []


@pytest.mark.world_size(2)
@pytest.mark.parametrize("counts", [(3, 2), (2, 3)])
def test_ranks_with_different_block_counts_fail_alike_at_the_first_forward(spawn, counts):
    errors = spawn(_wrapped_model_differs, counts, False)
    assert errors[0] == errors[1] and len(errors[0]) == 1, errors
    text = errors[0][0]
    assert "are building different things at the same point" in text, text
    assert "Block #3: DistributedLinear" in text and "the model (Distributed_Stack) at its first forward" in text, text
    assert "differ in the number or order of Blocks" in text


@pytest.mark.world_size(2)
def test_ranks_with_a_different_parameter_outside_blocks_fail_alike(spawn):
    errors = spawn(_wrapped_model_differs, (2, 2), True)
    assert errors[0] == errors[1] and len(errors[0]) == 1, errors
    text = errors[0][0]
    assert "the model (Distributed_Stack) at its first forward must be built alike" in text, text
    assert "'head.weight: (3, 4) torch.float32 sharded' vs 'head.weight: (5, 4) torch.float32 sharded'" in text, text


@pytest.mark.world_size(2)
def test_ranks_with_the_same_model_train(spawn):
    assert spawn(_wrapped_model_differs, (2, 2), False) == [[], []]
