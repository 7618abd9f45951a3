"""``bmt.config``: a read-only mapping view of the context, with the reference's keys."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from .context import get_context, is_initialized

__all__ = ["ConfigView", "config"]

_WRITABLE = frozenset({"save_param_to_cpu"})


class ConfigView(Mapping[str, Any]):
    """Keys of BMTrain 1.0.1's ``config`` dict, computed from the context on each read."""

    def _items(self) -> dict[str, Any]:
        if not is_initialized():
            return {"rank": 0, "local_rank": 0, "world_size": 1, "initialized": False}
        ctx = get_context()
        topo = ctx.topology
        c = ctx.comms
        s = ctx.streams
        items: dict[str, Any] = {
            "initialized": True,
            "rank": ctx.rank,
            "local_rank": ctx.local_rank,
            "world_size": ctx.world_size,
            "local_size": ctx.local_size,
            "device": ctx.device,
            "pipe_size": topo.pipe_size,
            "pipe_enabled": ctx.pipe_enabled,
            "tp_size": topo.tp_size,
            "tp_rank": topo.tp_id,
            "tp_zero_size": ctx.world_size // (topo.pipe_size * topo.tp_size),
            "tp_zero_rank": topo.tp_idx,
            "zero_size": ctx.world_size // topo.pipe_size,
            "zero_rank": ctx.rank,
            "topology": topo,
            "comm": c.world,
            "zero_comm": c.zero,
            "tp_comm": c.tp,
            "tp_zero_comm": c.tp_zero,
            "pipe_comm": c.pipe,
            "pp_zero_comm": c.pp_zero,
            "pp_tp_zero_comm": c.pp_tp_zero,
            "micros": ctx.micros,
            "calc_stream": s.calc,
            "load_stream": s.load,
            "tp_comm_stream": s.tp_comm,
            "pp_comm_stream": s.pp_comm,
            "barrier_stream": s.barrier,
            "load_event": s.load_event,
            "save_param_to_cpu": ctx.settings.save_param_to_cpu,
            "seed": ctx.seed,
            "backend": ctx.backend,
        }
        return items

    def __getitem__(self, key: str) -> Any:
        items = self._items()
        if key not in items:
            state = "after" if is_initialized() else "before"
            raise KeyError(f"config has no key {key!r} {state} init_distributed(); keys: {sorted(items)}")
        return items[key]

    def __setitem__(self, key: str, value: Any) -> None:
        if key not in _WRITABLE:
            raise KeyError(
                f"config[{key!r}] is read-only; only {sorted(_WRITABLE)} can be set "
                f"(topology and communicators come from init_distributed)"
            )
        setattr(get_context().settings, key, bool(value))

    def __iter__(self) -> Iterator[str]:
        return iter(self._items())

    def __len__(self) -> int:
        return len(self._items())

    def __repr__(self) -> str:
        return f"ConfigView({self._items()!r})"


config = ConfigView()
