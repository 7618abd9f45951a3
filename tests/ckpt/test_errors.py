"""Bad input to Blocks and block lists: errors that name the rule and the value."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from .models import Config, distribute_, make_layers


def _errors() -> None:
    from bmt_ckpt import Block, BlockMode, TransformerBlockList

    cfg = Config(layers=3)
    plain = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"Block parameters must be DistributedParameter; '0.weight' is Parameter"):
        Block(plain)
    with pytest.raises(TypeError, match="Block wraps a torch.nn.Module, got int"):
        Block(3)  # type: ignore[arg-type]
    a, b, p = (distribute_(m) for m in make_layers(cfg, seed=1))
    with pytest.raises(ValueError, match="zero_level must be 2 or 3, got 1"):
        Block(a, zero_level=1)
    with pytest.raises(ValueError, match="mode must be 'BLOCK' or 'PIPE', got 'pipe'"):
        Block(a, mode="pipe")
    block_a = Block(a)
    with pytest.raises(ValueError, match="parameter 'ln1.weight' already lives in another Block's storage"):
        Block(a)
    with pytest.raises(ValueError, match=r"a Block cannot wrap another Block \('0' is one\)"):
        Block(nn.Sequential(block_a))
    with pytest.raises(ValueError, match=r"the same Block is at index 0 and 2 of a TransformerBlockList"):
        TransformerBlockList([block_a, b, block_a])

    # a mode="PIPE" Block outside a pipeline list, and the reverse
    pipe_block = Block(p, mode="PIPE")
    assert pipe_block.mode is BlockMode.PIPE and pipe_block.mode == "PIPE"
    x = torch.randn(2, cfg.seq, cfg.dim)
    with pytest.raises(RuntimeError, match="built with mode='PIPE'.*build it with mode='BLOCK'"):
        pipe_block(x)
    with pytest.raises(ValueError, match="TransformerBlockList needs Blocks built with mode='BLOCK'.*mode='PIPE'"):
        TransformerBlockList([pipe_block])
    with pytest.raises(ValueError, match="PipelineTransformerBlockList needs Blocks built with mode='PIPE'"):
        block_a.attach_pipeline()
    pipe_block.attach_pipeline()
    assert pipe_block(x).shape == x.shape

    # storage built later, or shared
    (c,) = (distribute_(m) for m in make_layers(Config(layers=1), seed=2))
    late = Block(c, initialized=True)
    with pytest.raises(RuntimeError, match=r"no parameter storage yet: it was built with initialized=True; call init_param_storage\(\)"):
        late(x)
    with pytest.raises(ValueError, match="reference\\(\\) shares storage between Blocks wrapping the same inner module"):
        late.reference(block_a)
    late.init_param_storage()
    with pytest.raises(RuntimeError, match="storage is already built"):
        late.init_param_storage()
    assert late(x).shape == x.shape

    # things a Block cannot do
    y = block_a(x.requires_grad_())
    with pytest.raises(RuntimeError, match=r"does not support double backward \(backward with create_graph=True\)"):
        y.sum().backward(create_graph=True)
    with pytest.raises(RuntimeError, match=r"cannot move to torch.float64 on cpu; build the model in that dtype"):
        block_a.double()
    with pytest.raises(ValueError, match="num_hidden must be >= 1, got 0"):
        TransformerBlockList([], num_hidden=0)
    with pytest.raises(ValueError, match="num_hidden=2 needs at least 2 arguments, got 1"):
        TransformerBlockList([], num_hidden=2)(x)


@pytest.mark.world_size(1)
def test_errors_name_the_rule_and_the_value(spawn):
    spawn(_errors)
