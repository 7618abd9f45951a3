"""``TransformerBlockList``: Blocks run in sequence, each prefetching its neighbour's parameters."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import bmt_comm
import torch
from bmt_zero import check_agreement

from .block import Block, BlockMode
from .block.runtime import unlink_next

__all__ = ["TransformerBlockList", "chain_blocks"]


def chain_blocks(blocks: list[Block]) -> None:
    """Link consecutive Blocks so that each prefetches the next in forward (previous in backward)."""
    for i, block in enumerate(blocks):
        block.set_pre_module(blocks[i - 1] if i else None)
    if blocks:
        unlink_next(blocks[-1])


def _check_same_blocks(blocks: list[Block]) -> None:
    """One small collective over the zero group: every rank's list has the same Blocks, in order.
    A rank with fewer layers reaches this while another still builds its extra Block: the two
    checks meet and every rank raises the same error (not a transport crash later)."""
    names = [type(b._module).__name__ for b in blocks]
    what = f"TransformerBlockList of {len(blocks)} Blocks"
    check_agreement([what] + [f"#{i}: {n}" for i, n in enumerate(names)], bmt_comm.get_context().comms.zero, what)


class TransformerBlockList(torch.nn.Module):
    """Blocks as children ``"0"``, ``"1"``, ...; ``len()``, iteration and ``[int|str]`` work.

    Non-Block modules are wrapped in ``Block(m)``; the same plain module twice gets a second Block
    sharing the first one's storage. While block *i* computes, block *i+1*'s all-gather is in flight
    (forward and recomputation alike), and block *i*'s reduce-scatter overlaps block *i-1*'s backward;
    this holds for ``forward`` and for a Python loop over the list.
    """

    def __init__(self, modules: Iterable[torch.nn.Module], num_hidden: int = 1) -> None:
        super().__init__()
        if num_hidden < 1:
            raise ValueError(f"num_hidden must be >= 1, got {num_hidden}")
        self.num_hidden = num_hidden
        blocks: list[Block] = []
        wrapped: dict[int, Block] = {}  # id(plain module) -> its first Block
        for i, module in enumerate(modules):
            if isinstance(module, Block):
                for j, other in enumerate(blocks):
                    if other is module:
                        raise ValueError(
                            f"the same Block is at index {j} and {i} of a TransformerBlockList; a Block "
                            "holds its place once (to share weights, pass the plain module twice)"
                        )
                module.require_mode(BlockMode.BLOCK, "TransformerBlockList")
                block = module
            elif id(module) in wrapped:
                block = Block(module, initialized=True)
                block.reference(wrapped[id(module)])
            else:
                block = Block(module)
                wrapped[id(module)] = block
            blocks.append(block)
            self.add_module(str(i), block)
        self._blocks = blocks
        _check_same_blocks(blocks)
        chain_blocks(blocks)

    def __len__(self) -> int:
        return len(self._blocks)

    def __iter__(self) -> Iterator[Block]:
        return iter(self._blocks)

    def __getitem__(self, index: int | str) -> Block:
        if isinstance(index, str):
            return self._blocks[int(index)]
        return self._blocks[index]

    def forward(self, *args: Any, return_hidden_states: bool = False) -> Any:
        """The first ``num_hidden`` args are hidden states, the rest go unchanged to every block.

        Returns the last block's first output (a tuple of ``num_hidden`` when more than one);
        with ``return_hidden_states``, all its outputs followed by, per hidden state, the stack on
        dim 0 of that state's input to every block.
        """
        nh = self.num_hidden
        if len(args) < nh:
            raise ValueError(f"TransformerBlockList with num_hidden={nh} needs at least {nh} arguments, got {len(args)}")
        hidden: list[torch.Tensor] = []
        outputs: tuple[Any, ...] = tuple(args[:nh])
        for block in self._blocks:
            if return_hidden_states:
                hidden.extend(args[:nh])
            out = block(*args)
            outputs = out if isinstance(out, tuple) else (out,)
            args = outputs + tuple(args[nh:])
        if return_hidden_states:
            stacked = tuple(torch.stack(hidden[k::nh], dim=0) for k in range(nh))
            return outputs + stacked
        return tuple(outputs[:nh]) if nh > 1 else outputs[0]
