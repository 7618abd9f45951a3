"""``bmtrain.init``: set up the process group, topology, communicators and streams."""

from bmt_comm import destroy, init_distributed, is_initialized

__all__ = ["init_distributed", "is_initialized", "destroy"]
