"""``bmtrain.param_init``: run each parameter's ``init_method``; list parameters by group."""

from bmt_zero import grouped_parameters, init_parameters

__all__ = ["init_parameters", "grouped_parameters"]
