"""``PipelineTransformerBlockList``: consecutive layers split over pipeline stages.

Each stage builds and stores only its own layers, as Blocks in ``mode="PIPE"`` (ZeRO over the
ranks of the stage: ``pp_zero``, or ``pp_tp_zero`` for tensor-parallel parameters). The batch of a
pipe group (one rank per stage) is cut into ``ctx.micros`` micro-batches that flow through the
stages (GPipe, through autograd: see ``_pipe_ops``). From outside it looks data-parallel: each
rank passes its rows and gets back the output for them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import bmt_comm
import torch
from bmt_zero import DistributedParameter
from torch.nn.modules.module import _IncompatibleKeys

from ..block import Block, BlockMode
from ._pipe_ops import (
    BatchArg,
    HiddenStatesToOwners,
    PipeIn,
    PipeLink,
    PipeOut,
    StageRecv,
    StageSend,
    TieToInput,
)
from ._pipe_state import (
    collect_layer_states,
    layer_index,
    layer_keys,
    new_state_dict,
    order_layer_keys,
    order_reported,
)
from .pipe_schedule import MicroBatches, StagePartition

__all__ = ["PipelineTransformerBlockList"]


def _pipe_block(module: torch.nn.Module) -> Block:
    """A plain module becomes a ZeRO-2 Block (one gather serves every micro-batch's forward and
    backward); a Block must have been built with mode="PIPE"."""
    block = module if isinstance(module, Block) else Block(module, zero_level=2, mode=BlockMode.PIPE)
    block.attach_pipeline()  # raises for a Block built with another mode
    comms = bmt_comm.get_context().comms
    for p in block.parameters():  # a PIPE Block's storage lives over its stage's group
        if isinstance(p, DistributedParameter):
            assert p.shard_comm is (comms.pp_tp_zero if p.tp_mode else comms.pp_zero), p
    return block


class PipelineTransformerBlockList(torch.nn.Module):
    """Layers ``0 .. L-1`` over ``stages`` pipeline stages; stage ``s`` runs
    ``L // stages + (s < L % stages)`` consecutive ones (``get_range_by_stage_id``).

    ``forward(hidden_state, *args, batch_related=(), return_hidden_states=False)``: every rank
    passes its rows of the hidden states (the same shape on every rank of a pipe group) and the
    layers' extra arguments. Tensor arguments listed in ``batch_related`` (by index; when empty:
    tensors with the hidden states' ndim and dim-0 size) are split with the batch, the others
    go to every micro-batch whole. Returns this rank's rows of the output and, with
    ``return_hidden_states``, ``(output, hidden_states)``: the input of every layer for these
    rows, stacked on dim 0 ``(L, *hidden_state.shape)``.
    """

    def __init__(self, modules: Iterable[torch.nn.Module], num_hidden: int = 1) -> None:
        super().__init__()
        if num_hidden != 1:
            raise ValueError(f"PipelineTransformerBlockList passes one hidden state (num_hidden=1), got {num_hidden}")
        self.num_hidden = num_hidden
        ctx = bmt_comm.get_context()
        topo = ctx.topology
        layers = list(modules)
        self.stages = topo.stages
        self.stage_id = topo.stage_id
        self.pipe_idx = topo.pipe_idx
        self.partition = StagePartition(len(layers), self.stages)
        self.layer_ids = list(self.partition.range_of(self.stage_id))
        self._other_keys: dict[int, list[str]] = {}  # other stages' layers: the keys their Blocks load
        for idx, module in enumerate(layers):
            # every rank builds every Block: moving a layer's parameters into a stage's storage
            # gathers them over the group they live in now (the world); other stages' Blocks
            # are dropped right away, so only this stage's layers stay in memory
            block = _pipe_block(module)
            if idx in self.layer_ids:
                self.add_module(str(idx), block)
            else:
                self._other_keys[idx] = layer_keys(block._module)
        self._load_marks: _LoadMarks | None = None  # set while a load walks this module
        self.register_state_dict_post_hook(order_layer_keys)  # type: ignore[no-untyped-call]
        self.register_load_state_dict_post_hook(_order_load_report)  # type: ignore[no-untyped-call]
        prev: Block | None = None
        for idx in self.layer_ids:
            block = self._block(idx)
            block.set_pre_module(prev)
            prev = block

    # --- layout --------------------------------------------------------------------------
    def get_range_by_stage_id(self, stage_id: int) -> range:
        return self.partition.range_of(stage_id)

    def get_part_len_by_stage_id(self, stage_id: int) -> int:
        return self.partition.part_len(stage_id)

    def get_stage_by_layer_id(self, layer_id: int) -> int:
        return self.partition.stage_of(layer_id)

    def _block(self, idx: int) -> Block:
        block = self._modules[str(idx)]
        assert isinstance(block, Block)
        return block

    def __len__(self) -> int:
        return self.partition.num_layers

    def __iter__(self) -> Iterator[Block]:
        """This stage's Blocks (the others live on other ranks)."""
        return (self._block(i) for i in self.layer_ids)

    def __getitem__(self, index: int | str) -> Block:
        idx = int(index)
        if idx < 0:
            idx += len(self)
        stage = self.partition.stage_of(idx)
        if stage != self.stage_id:
            raise IndexError(f"layer {idx} runs on pipeline stage {stage}; this rank is on stage {self.stage_id}")
        return self._block(idx)

    # --- forward ---------------------------------------------------------------------------
    def _split_args(
        self, hidden: torch.Tensor, args: tuple[Any, ...], batch_related: Iterable[int], link: PipeLink,
        batches: MicroBatches,
    ) -> tuple[list[list[Any]], list[torch.Tensor]]:
        """Per micro-batch argument lists, and the gathered batch arguments (kept in the graph)."""
        chosen = set(batch_related)
        for i in chosen:
            if not 0 <= i < len(args) or not isinstance(args[i], torch.Tensor):
                raise ValueError(f"batch_related index {i} must name a tensor among the {len(args)} extra args")
            if args[i].dim() == 0 or args[i].shape[0] != hidden.shape[0]:
                raise ValueError(
                    f"batch-related arg {i} must have dim 0 = the hidden states' ({hidden.shape[0]}), "
                    f"got shape {tuple(args[i].shape)}"
                )
        if not chosen:
            chosen = {
                i for i, a in enumerate(args)
                if isinstance(a, torch.Tensor) and a.dim() == hidden.dim() and a.shape[0] == hidden.shape[0]
            }
        per_micro: list[list[Any]] = [[] for _ in batches.sizes]
        gathered: list[torch.Tensor] = []
        for i, arg in enumerate(args):
            if i in chosen:
                full: torch.Tensor = BatchArg.apply(arg, link)  # type: ignore[no-untyped-call]
                gathered.append(full)
                for m, part in enumerate(torch.split(full, list(batches.sizes), dim=0)):
                    per_micro[m].append(part)
            else:
                for m in range(len(batches.sizes)):
                    per_micro[m].append(arg)
        return per_micro, gathered

    def forward(
        self,
        hidden_state: torch.Tensor,
        *args: Any,
        batch_related: Iterable[int] = (),
        return_hidden_states: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        ctx = bmt_comm.get_context()
        link = PipeLink.current()
        if hidden_state.dim() == 0:
            raise ValueError("the hidden state must have a batch dim (dim 0), got a scalar")
        cut = False  # this stage's input needs no grad: run its layers on it detached
        if torch.is_grad_enabled():
            flags = _GradFlags.exchange(link, hidden_state, args, list(self))
            if not flags.any_graph:
                # every layer of every stage frozen and no input needs grad: as in torch, the
                # output needs no grad and each layer runs once, with nothing kept for a backward
                with torch.no_grad():
                    return self.forward(
                        hidden_state, *args, batch_related=batch_related, return_hidden_states=return_hidden_states
                    )
            # (the stacked hidden states' backward is a collective every stage must reach: kept whole)
            cut = not flags.upstream(link.stage) and not return_hidden_states
        batches = MicroBatches(hidden_state.shape[0], link.stages, ctx.micros)
        per_micro, gathered = self._split_args(hidden_state, args, batch_related, link, batches)
        # a leaf that requires grad: every stage's graph reaches PipeIn, even if hidden needs none
        anchor = torch.empty(0, device=hidden_state.device, requires_grad=torch.is_grad_enabled())
        source: torch.Tensor = PipeIn.apply(anchor, hidden_state, link)  # type: ignore[no-untyped-call]
        offsets = [sum(batches.sizes[:m]) for m in range(len(batches.sizes))]

        outs: list[torch.Tensor] = []
        layer_inputs: list[list[torch.Tensor]] = []  # [micro][layer]
        for m, size in enumerate(batches.sizes):
            if link.is_first:
                h = source[offsets[m] : offsets[m] + size]
            else:
                h = StageRecv.apply(source, link)  # type: ignore[no-untyped-call]
            inputs, entry = [], h
            if cut:  # frozen leading layers run once, outside autograd, as torch runs them
                h = h.detach()
            for idx in self.layer_ids:
                inputs.append(h)
                h = self._run_layer(idx, h, per_micro[m])
            if cut:  # the pipe ops' backward (a collective) still reaches this stage's input
                h = TieToInput.apply(h, entry)  # type: ignore[no-untyped-call]
            if return_hidden_states:
                layer_inputs.append(inputs)
            outs.append(h if link.is_last else StageSend.apply(h, link))  # type: ignore[no-untyped-call]

        output: torch.Tensor = PipeOut.apply(link, batches, len(outs), *outs, *gathered)  # type: ignore[no-untyped-call]
        if not return_hidden_states:
            return output
        mine = torch.cat([torch.stack(inputs, dim=0) for inputs in layer_inputs], dim=1)  # (L_s, total, ...)
        per_stage = tuple(self.partition.part_len(s) for s in range(self.stages))
        states: torch.Tensor = HiddenStatesToOwners.apply(mine, link, batches, per_stage)  # type: ignore[no-untyped-call]
        return output, states

    def _run_layer(self, idx: int, h: torch.Tensor, args: list[Any]) -> torch.Tensor:
        out = self._block(idx)(h, *args)
        if not isinstance(out, torch.Tensor):
            raise TypeError(
                f"a pipelined layer must return the hidden state as one tensor; layer {idx} returned "
                f"{type(out).__name__}"
            )
        return out

    # --- state dicts -------------------------------------------------------------------------
    def _all_layers_state(self, prefix: str, keep_vars: bool) -> dict[str, Any]:
        blocks: dict[int, torch.nn.Module] = {idx: self._block(idx) for idx in self.layer_ids}
        return collect_layer_states(blocks, self.stage_id, prefix, keep_vars)

    def state_dict(self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False) -> Any:
        """Every layer's full tensors, keyed ``"<layer>.<name>"`` like a plain list of layers.

        Collective over the world. Each stage gathers its own layers, then the stages exchange
        them over the pipe group; inside ``bmt_zero.gather.gather_to(dst)`` only ``dst`` keeps
        them, else every rank does.
        """
        if args:
            raise TypeError("PipelineTransformerBlockList.state_dict takes keyword arguments only")
        if destination is None:
            destination = new_state_dict()
        destination.update(self._all_layers_state(prefix, keep_vars))
        return destination

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        """Reached only when a checkpoint walk (``bmt_zero.store``) starts at this module instead of
        calling ``state_dict``: the walk saves this stage's Blocks (the children) itself, so add
        the other stages' layers here (``_order_layers`` then restores the layer order)."""
        own = {str(idx) for idx in self.layer_ids}
        for key, value in self._all_layers_state(prefix, keep_vars).items():
            if key[len(prefix) :].split(".", 1)[0] not in own:
                destination[key] = value

    def _load_from_state_dict(
        self,
        state_dict: Mapping[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        """Own layers load through their Blocks (children); other stages' keys are theirs to load,
        and this rank reports them missing or unexpected as their Blocks do there (in layer order:
        ``_order_load_report``), so every rank reports the whole model's keys."""
        self._load_marks = _LoadMarks(prefix, len(missing_keys), len(unexpected_keys))
        if not strict:
            return
        for key in state_dict:
            if not key.startswith(prefix):
                continue
            idx = layer_index(key, prefix, len(self))
            if idx < 0:
                unexpected_keys.append(key)
            elif idx in self._other_keys and key[len(f"{prefix}{idx}.") :] not in self._other_keys[idx]:
                unexpected_keys.append(key)
        for idx, keys in self._other_keys.items():
            missing_keys.extend(f"{prefix}{idx}.{k}" for k in keys if f"{prefix}{idx}.{k}" not in state_dict)

    def _bmt_children_everywhere(self) -> list[str]:
        """Every layer's child name, same list on every rank (``bmt_zero.store.children_everywhere``):
        ``bmt.load`` loads layer after layer, the other stages following while a stage loads its own."""
        return [str(idx) for idx in range(len(self))]


@dataclass(frozen=True)
class _GradFlags:
    """What needs a gradient in this forward, over the pipe group: whether any member's inputs
    do, and which stages hold a trainable parameter."""

    inputs: bool
    trainable: tuple[bool, ...]  # by stage

    @classmethod
    def exchange(cls, link: PipeLink, hidden: torch.Tensor, args: tuple[Any, ...], blocks: list[Block]) -> _GradFlags:
        """Collective over the pipe group: one all-gather of two flags per stage (none with one stage)."""
        inputs = hidden.requires_grad or any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
        trainable = any(p.requires_grad for block in blocks for p in block.parameters())
        if link.stages == 1:
            return cls(inputs, (trainable,))
        mine = torch.tensor([float(inputs), float(trainable)], device=link.device)
        every = torch.empty(2 * link.stages, device=link.device)
        with link.on_stream():
            link.comm.all_gather(mine, every)
        flags = [bool(v) for v in every.tolist()]
        return cls(any(flags[0::2]), tuple(flags[1::2]))

    @property
    def any_graph(self) -> bool:
        return self.inputs or any(self.trainable)

    def upstream(self, stage: int) -> bool:
        """Whether stage ``stage``'s input needs a gradient (an input, or an earlier stage, trains)."""
        return self.inputs or any(self.trainable[:stage])


@dataclass(frozen=True)
class _LoadMarks:
    """Where a load walk reached this pipeline: its prefix and the report lists' lengths then."""

    prefix: str
    missing: int
    unexpected: int


def _order_load_report(module: torch.nn.Module, incompatible: _IncompatibleKeys) -> None:
    """Load post-hook: the keys reported under the pipeline in layer order, the same on every rank."""
    assert isinstance(module, PipelineTransformerBlockList)
    marks, module._load_marks = module._load_marks, None
    if marks is None:
        return
    order_reported(incompatible.missing_keys, marks.missing, marks.prefix, len(module))
    order_reported(incompatible.unexpected_keys, marks.unexpected, marks.prefix, len(module))
