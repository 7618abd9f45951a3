"""The three collective benchmarks (each re-exported under its 1.0.1 module path)."""

from __future__ import annotations

import bmt_comm
import torch
from bmt_comm import Communicator

from .timing import Measurement, buffer_dtype, default_sizes, format_size, measure

__all__ = ["all_gather", "reduce_scatter", "send_recv"]


def _setup(comm: Communicator | None, sizes: list[int] | None) -> tuple[Communicator, list[int], torch.dtype]:
    ctx = bmt_comm.get_context()
    comm = comm or ctx.comms.world
    return comm, sizes or default_sizes(comm.device), buffer_dtype(comm.device)


def _report(m: Measurement) -> None:
    bmt_comm.print_rank(
        f"{m.op}:\tsize {format_size(m.size_bytes):>8}\ttime: {m.seconds * 1e3:9.3f} ms\t"
        f"algbw: {m.algbw_gbps:8.3f} GB/s\tbusbw: {m.busbw_gbps:8.3f} GB/s"
    )


def _elements(size_bytes: int, dtype: torch.dtype, multiple: int) -> int:
    per = torch.tensor([], dtype=dtype).element_size()
    return max(multiple, size_bytes // per // multiple * multiple)


def all_gather(comm: Communicator | None = None, sizes: list[int] | None = None, iters: int = 5) -> list[Measurement]:
    """All-gather into an output of each size (each rank sends ``size / n``)."""
    comm, sizes, dtype = _setup(comm, sizes)
    results = []
    for size in sizes:
        numel = _elements(size, dtype, comm.size)
        out = torch.empty(numel, dtype=dtype, device=comm.device)
        inp = torch.ones(numel // comm.size, dtype=dtype, device=comm.device)
        nbytes = out.numel() * out.element_size()

        def run(inp: torch.Tensor = inp, out: torch.Tensor = out) -> None:
            comm.all_gather(inp, out)

        m = measure("all_gather", comm, nbytes, run, (comm.size - 1) / comm.size, iters)
        _report(m)
        results.append(m)
    return results


def reduce_scatter(comm: Communicator | None = None, sizes: list[int] | None = None, iters: int = 5) -> list[Measurement]:
    """Reduce-scatter (sum) an input of each size (each rank keeps ``size / n``)."""
    comm, sizes, dtype = _setup(comm, sizes)
    results = []
    for size in sizes:
        numel = _elements(size, dtype, comm.size)
        inp = torch.ones(numel, dtype=dtype, device=comm.device)
        out = torch.empty(numel // comm.size, dtype=dtype, device=comm.device)
        nbytes = inp.numel() * inp.element_size()

        def run(inp: torch.Tensor = inp, out: torch.Tensor = out) -> None:
            comm.reduce_scatter(inp, out, bmt_comm.ReduceOp.SUM)

        m = measure("reduce_scatter", comm, nbytes, run, (comm.size - 1) / comm.size, iters)
        _report(m)
        results.append(m)
    return results


def send_recv(comm: Communicator | None = None, sizes: list[int] | None = None, iters: int = 5) -> list[Measurement]:
    """Ping-pong between group ranks ``2k`` and ``2k+1``; bandwidth of one direction.

    A last unpaired rank only takes part in the timing barriers. Needs at least 2 ranks.
    """
    comm, sizes, dtype = _setup(comm, sizes)
    if comm.size < 2:
        bmt_comm.print_rank(f"send_recv needs at least 2 ranks, this group has {comm.size}")
        return []
    peer = comm.rank ^ 1
    paired = peer < comm.size
    results = []
    for size in sizes:
        numel = _elements(size, dtype, 1)
        buf = torch.ones(numel, dtype=dtype, device=comm.device)

        def ping_pong(buf: torch.Tensor = buf) -> None:
            if not paired:
                return
            if comm.rank % 2 == 0:  # the even rank speaks first so the pair never both wait
                comm.send(buf, peer)
                comm.recv(buf, peer)
            else:
                comm.recv(buf, peer)
                comm.send(buf, peer)

        nbytes = buf.numel() * buf.element_size()
        m = measure("send_recv", comm, 2 * nbytes, ping_pong, 1.0, iters)
        m = Measurement(m.op, nbytes, m.seconds / 2, m.algbw_gbps, m.busbw_gbps)  # one direction
        _report(m)
        results.append(m)
    return results
