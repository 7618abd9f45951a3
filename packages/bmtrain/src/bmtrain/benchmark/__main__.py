"""``torchrun --nproc_per_node=N -m bmtrain.benchmark``: all three benchmarks on the world group."""

from __future__ import annotations

import bmt_comm

from . import all_gather, reduce_scatter, send_recv


def main() -> None:
    bmt_comm.init_distributed()
    try:
        all_gather()
        reduce_scatter()
        send_recv()
    finally:
        bmt_comm.destroy()


if __name__ == "__main__":
    main()
