"""Host-level synchronisation and the reference's loss/result helpers."""

from __future__ import annotations

import torch

from .communicator import Communicator, ReduceOp
from .context import get_context
from .streams import stream_context

__all__ = ["synchronize", "wait_loader", "sum_loss", "gather_result"]


def synchronize(comm: Communicator | None = None) -> None:
    """Barrier over ``comm`` (the world by default) after all work this rank has queued.

    Unlike the reference, the barrier stream first waits for the current (compute) stream, so the
    barrier also orders against compute.
    """
    ctx = get_context()
    comm = comm or ctx.comms.world
    barrier = ctx.streams.barrier
    if barrier is not None:
        barrier.wait_stream(torch.cuda.current_stream(ctx.device))
    with stream_context(barrier):
        comm.barrier()
    if barrier is not None:
        barrier.synchronize()


def wait_loader() -> None:
    """Host waits for the last load (ZeRO gather) and the calc stream records the event again."""
    streams = get_context().streams
    if streams.load_event is None or streams.calc is None:
        return
    streams.load_event.synchronize()
    streams.calc.record_event(streams.load_event)


def sum_loss(loss: torch.Tensor, comm: Communicator | None = None) -> torch.Tensor:
    """The **mean** of ``loss`` over ranks (the reference's misnamed helper); differentiable as in
    1.0.1 (each rank's gradient is ``1/world_size`` of the result's)."""
    from .collectives import all_reduce

    return all_reduce(loss, ReduceOp.AVG, comm)


def gather_result(result: torch.Tensor, comm: Communicator | None = None) -> torch.Tensor:
    """Concatenate every rank's ``result`` on dim 0 (a scalar counts as one row); not differentiable.

    Every rank must pass the same shape (checked: one small object exchange first). The output
    stays on the input's device.
    """
    from .objects import allgather_objects

    ctx = get_context()
    comm = comm or ctx.comms.world
    shapes = allgather_objects(tuple(result.shape), comm)
    if any(s != shapes[0] for s in shapes):
        raise ValueError(f"gather_result needs the same shape on every rank, got shapes by rank {shapes}")
    src = result.detach().contiguous()
    moved = src.device != comm.device
    if moved:
        src = src.to(comm.device)
    rows = (comm.size * src.shape[0], *src.shape[1:]) if src.dim() else (comm.size,)
    out = torch.empty(rows, dtype=src.dtype, device=src.device)
    comm.all_gather(src, out)
    return out.to(result.device) if moved else out
