"""``bmtrain.inspect``: statistics of hidden states (``inspect_tensor`` / ``record_tensor``) and of
parameters (``inspect_model``), and ``format_summary`` to print them."""

from .format import format_summary
from .model import inspect_model
from .tensor import InspectTensor, inspect_tensor, record_tensor

__all__ = ["inspect_tensor", "record_tensor", "InspectTensor", "inspect_model", "format_summary"]
