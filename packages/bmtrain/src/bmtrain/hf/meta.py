"""Build a transformers model without its weights and wrap it: each rank allocates its shards only."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from typing import Any

import torch
from bmt_zero.init_params import init_parameters
from bmt_zero.parameter import DistributedParameter, ParameterInitializer

from .load import load_pretrained

__all__ = ["parameters_on_meta", "from_config", "from_pretrained"]

_PATCH_LOCK = threading.Lock()  # register_parameter is patched process-wide: one build at a time


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Inside, every parameter a module registers moves to the ``meta`` device at once (its
    constructor's initialisation then runs on meta, for free); buffers are built as usual, so
    computed ones (rotary frequencies) keep their values. At most one parameter is ever real."""
    original = torch.nn.Module.register_parameter

    def register(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = torch.nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    with _PATCH_LOCK:
        torch.nn.Module.register_parameter = register  # type: ignore[method-assign,assignment]
        try:
            yield
        finally:
            torch.nn.Module.register_parameter = original  # type: ignore[method-assign]


def _default_init(model: torch.nn.Module, std: float) -> None:
    """Hugging Face's defaults for these layers: weights of 2+ dims normal(0, ``std``), biases
    zeros, other 1-D weights (norms) ones."""
    normal = ParameterInitializer(torch.nn.init.normal_, 0.0, std)
    zeros, ones = ParameterInitializer(torch.nn.init.zeros_), ParameterInitializer(torch.nn.init.ones_)
    for name, p in model.named_parameters():
        if not isinstance(p, DistributedParameter):
            continue
        shape = p.original_shape
        if len(shape) >= 2:
            p.init_method = normal
        elif name.rsplit(".", 1)[-1] == "bias":
            p.init_method = zeros
        else:
            p.init_method = ones
    init_parameters(model)


def from_config(
    config_or_cls: Any,
    config: Any = None,
    *,
    dtype: torch.dtype | None = None,
    init: bool = True,
    **model_kwargs: Any,
) -> torch.nn.Module:
    """Collective: a transformers model built on ``meta`` and wrapped by ``BMTrainModelWrapper``,
    so every rank allocates only its shards (no full parameter ever exists).

    ``config_or_cls``: a ``PretrainedConfig`` (the model is ``AutoModelForCausalLM``'s for it), or
    a model class (with ``config``, default ``cls.config_class()``). ``dtype`` casts before the
    shards exist. ``init=True`` initialises with ``config.initializer_range`` (see
    ``_default_init``); ``init=False`` leaves zeros for :func:`load_pretrained` to fill.
    """
    import transformers

    from ..wrapper import BMTrainModelWrapper  # bmtrain.wrapper imports this package

    if isinstance(config_or_cls, type):
        cls: Any = config_or_cls
        cfg = config if config is not None else cls.config_class()
        build: Any = lambda: cls(cfg, **model_kwargs)  # noqa: E731
    else:
        if config is not None:
            raise TypeError("pass the config once: from_config(config) or from_config(ModelClass, config)")
        cfg = config_or_cls
        auto: Any = transformers.AutoModelForCausalLM
        build = lambda: auto.from_config(cfg, **model_kwargs)  # noqa: E731
    with parameters_on_meta():
        model: torch.nn.Module = build()
    if dtype is not None:
        model.to(dtype)
    leftover = [n for n, p in model.named_parameters() if p.device.type != "meta"]
    if leftover:
        raise RuntimeError(f"parameters built off the meta device, so allocated in full: {leftover[:5]}")
    BMTrainModelWrapper(model)
    if init:
        _default_init(model, float(getattr(cfg, "initializer_range", 0.02)))
    return model


def from_pretrained(directory: str | os.PathLike[str], *, dtype: torch.dtype | None = None,
                    cast_dtype: bool = False, **model_kwargs: Any) -> torch.nn.Module:
    """Collective: ``from_config(AutoConfig.from_pretrained(directory))`` filled by
    :func:`load_pretrained` (each rank reads its own slices)."""
    import transformers

    cfg = transformers.AutoConfig.from_pretrained(os.fspath(directory))
    model = from_config(cfg, dtype=dtype, init=False, **model_kwargs)
    load_pretrained(model, directory, cast_dtype=cast_dtype)
    return model
