"""BMTrain 1.0.1's ``bmtrain.optim._distributed``: gather an offload optimizer's sharded state."""

from __future__ import annotations

from typing import Any

import bmt_comm
import torch

__all__ = ["state_dict_gather"]

_GATHERED = ("exp_avg", "exp_avg_sq", "_param_fp32")  # the state tensors 1.0.1 gathers


def _gather_flat(t: torch.Tensor) -> torch.Tensor:
    """Every rank's ``t`` flattened and concatenated in rank order, fp32, on the CPU."""
    ctx = bmt_comm.get_context()
    comm, dev = ctx.comms.world, ctx.device
    flat = t.detach().reshape(-1).to(dev, torch.float32)
    numels = torch.empty(comm.size, dtype=torch.int64, device=dev)
    comm.all_gather(torch.tensor([flat.numel()], dtype=torch.int64, device=dev), numels)
    sizes = [int(n) for n in numels.tolist()]
    longest = max(sizes)
    if longest == 0:
        return torch.empty(0, dtype=torch.float32)
    padded = torch.zeros(longest, dtype=torch.float32, device=dev)
    padded[: flat.numel()] = flat
    out = torch.empty(comm.size, longest, dtype=torch.float32, device=dev)
    comm.all_gather(padded, out)
    return torch.cat([out[r, :n] for r, n in enumerate(sizes)]).cpu()


def state_dict_gather(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Replace, in place, each parameter's ``exp_avg``, ``exp_avg_sq`` and ``_param_fp32`` by the
    concatenation of every rank's (rank order, fp32, CPU); a parameter without state on this rank
    gets empty ones and the last ``step`` seen. Collective over the world; returns ``state_dict``.

    1.0.1 pads with -1e15 and drops every -1e15 after the gather; this trims by each rank's
    length, so a state value that is exactly -1e15 survives here.
    """
    state = state_dict["state"]
    keys = [p for group in state_dict["param_groups"] for p in group["params"]]
    step = None
    for v in state.values():
        if "step" in v:
            step = v["step"]
    for k in keys:
        if k not in state:
            state[k] = {name: torch.empty(0, dtype=torch.float32) for name in _GATHERED}
            state[k]["step"] = step
        v = state[k]
        for name in _GATHERED:
            if name in v:
                v[name] = _gather_flat(v[name])
    return state_dict
