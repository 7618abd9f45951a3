"""``FlatStorage``: the flat buffers of a set of parameters (a Block's), one per ``BufferKey``.

The parts live in their own modules: the layout arithmetic in ``flat_layout`` (no
communication), one buffer's memory, gathers and gradient reductions in ``flat_buffer``, and the
check that every rank builds the same storage in ``agreement``. The names they define are
re-exported here, where they were first defined.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from bmt_comm import Communicator

from .agreement import check_plans_agree
from .flat_buffer import BufferState, FlatBuffer, FlatInfo, ReduceHandle, flat_info
from .flat_layout import ALIGN_BYTES, BufferKey, FlatLayout, FlatSlot, plan_layout
from .parameter import DistributedParameter

__all__ = [
    "ALIGN_BYTES",
    "BufferKey",
    "BufferState",
    "FlatBuffer",
    "FlatInfo",
    "FlatLayout",
    "FlatSlot",
    "FlatStorage",
    "ReduceHandle",
    "flat_info",
    "plan_layout",
]


class FlatStorage:
    """The flat buffers of a set of parameters, one per ``BufferKey`` in order of first appearance."""

    def __init__(
        self,
        named_params: Sequence[tuple[str, DistributedParameter]],
        comm_for: Callable[[DistributedParameter], Communicator],
        build_chunk_numel: int | None = None,
        *,
        agree_over: Communicator | None = None,
        what: str = "a flat storage",
        header: Sequence[str] = (),
    ) -> None:
        """``agree_over``: a group holding every buffer's group (a Block's zero group), over which
        the ranks first check that they describe the storage alike (``check_agreement``); None
        when all parameters use one communicator, which is then that group. ``header``: entries
        that lead the description (a Block's place among the Blocks built so far)."""
        groups: dict[BufferKey, list[tuple[str, DistributedParameter]]] = {}
        for name, p in named_params:
            if not isinstance(p, DistributedParameter):
                raise TypeError(f"flat storage holds DistributedParameters; '{name}' is {type(p).__name__}")
            if p._in_block:
                raise ValueError(f"parameter '{name}' already lives in another flat storage (a Block)")
            groups.setdefault(BufferKey.of(p), []).append((name, p))
        plans: list[tuple[FlatLayout, list[DistributedParameter], Communicator]] = []
        for key, members in groups.items():
            comms = {id(comm_for(p)): comm_for(p) for _, p in members}
            if len(comms) != 1:
                raise ValueError(f"parameters of flat buffer {key.name} use {len(comms)} different communicators")
            comm = next(iter(comms.values()))
            layout = plan_layout(key, [(name, p._original_shape) for name, p in members], comm.size)
            plans.append((layout, [p for _, p in members], comm))
        check_plans_agree(plans, agree_over, what, header)
        self.buffers: list[FlatBuffer] = []
        self._where: dict[str, tuple[FlatBuffer, int]] = {}
        for layout, params, comm in plans:
            buf = FlatBuffer(layout, params, comm, build_chunk_numel)
            self.buffers.append(buf)
            for i, slot in enumerate(layout.slots):
                self._where[slot.name] = (buf, i)

    @property
    def state(self) -> BufferState:
        """RELEASED / GATHERED if every buffer is; GATHERING if any gather is still in flight."""
        states = {b.state for b in self.buffers}
        if BufferState.GATHERING in states:
            return BufferState.GATHERING
        if BufferState.RELEASED in states:
            return BufferState.RELEASED
        return BufferState.GATHERED

    @property
    def in_place(self) -> bool:
        """Every buffer lives over a group of one: the shards are the full buffers, never gathered
        or released (see ``flat_buffer``)."""
        return all(b.in_place for b in self.buffers)

    def names(self) -> list[str]:
        return list(self._where)

    def named_parameters(self) -> Iterator[tuple[str, DistributedParameter]]:
        for name, (buf, i) in self._where.items():
            yield name, buf.params[i]

    def gather_async(self, force: bool = False) -> None:
        for b in self.buffers:
            b.gather_async(force)

    def wait(self) -> None:
        for b in self.buffers:
            b.wait()

    def release(self) -> None:
        for b in self.buffers:
            b.release()

    def bind_full(self, grads: Sequence[torch.Tensor | None] | None = None) -> None:
        for i, b in enumerate(self.buffers):
            b.bind_full(None if grads is None else grads[i])

    def bind_shard(self) -> None:
        for b in self.buffers:
            b.bind_shard()

    def new_full_grads(self) -> list[torch.Tensor | None]:
        """A zeroed full gradient buffer per trainable flat buffer (None for one whose parameters
        are all frozen: nothing is reduced into it, so its parameters' ``.grad`` stay as they are)."""
        return [b.new_full_grad() if b.trainable else None for b in self.buffers]

    def reduce_scatter_grads(self, grads: Sequence[torch.Tensor | None]) -> list[ReduceHandle]:
        return [b.reduce_scatter_grad(g) for b, g in zip(self.buffers, grads, strict=True) if g is not None]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for b in self.buffers:
            b.zero_grad(set_to_none)

    def flat_parameters(self) -> list[torch.nn.Parameter]:
        return [b.shard for b in self.buffers]

    def grouped_parameters(self) -> Iterator[tuple[str | None, list[torch.nn.Parameter]]]:
        """``(group, [flat shard params])`` per parameter group, in order of first appearance."""
        by_group: dict[str | None, list[torch.nn.Parameter]] = {}
        for b in self.buffers:
            by_group.setdefault(b.layout.key.group, []).append(b.shard)
        yield from by_group.items()

    def full_tensor(self, name: str) -> torch.Tensor:
        """The gathered full value of parameter ``name`` (a view: valid until released)."""
        buf, i = self._lookup(name)
        return buf.full_view(i)

    def load_full(self, name: str, full: torch.Tensor) -> None:
        buf, i = self._lookup(name)
        buf.load_full(i, full)

    def _lookup(self, name: str) -> tuple[FlatBuffer, int]:
        try:
            return self._where[name]
        except KeyError:
            raise KeyError(f"no parameter named '{name}' in this flat storage") from None
