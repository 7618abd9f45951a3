"""Key mappings between a model's state-dict names and a checkpoint's (Hugging Face) names.

A rule is a pair of templates, ``("layers.{i}.attention.wq.weight",
"model.layers.{i}.self_attn.q_proj.weight")``: ``{name}`` stands for a run of digits and must
appear in both. Rules apply in order, the first match wins, a key no rule matches keeps its name
(``passthrough``) or is an error. A rule may also reorder the rows (dim 0) of its tensor, for a
layout difference such as rotary embeddings that rotate interleaved pairs in one model and
halves in the other.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

__all__ = ["KeyMapping", "KeyRule", "interleaved_to_halves"]

RowOrder = Callable[[torch.Size], torch.Tensor]  # full shape -> perm: model[i] = file[perm[i]]

_FIELD = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _compile(template: str) -> tuple[re.Pattern[str], tuple[str, ...]]:
    parts, names, pos = [], [], 0
    for m in _FIELD.finditer(template):
        parts.append(re.escape(template[pos : m.start()]))
        parts.append(f"(?P<{m.group(1)}>[0-9]+)")
        names.append(m.group(1))
        pos = m.end()
    parts.append(re.escape(template[pos:]))
    return re.compile("".join(parts) + r"\Z"), tuple(names)


@dataclass(frozen=True)
class KeyRule:
    """``model`` template <-> ``file`` template; ``rows``: the row order of the model's tensor."""

    model: str
    file: str
    rows: RowOrder | None = None
    _model_re: re.Pattern[str] = field(init=False, repr=False, compare=False)
    _file_re: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        model_re, model_names = _compile(self.model)
        file_re, file_names = _compile(self.file)
        if sorted(model_names) != sorted(file_names):
            raise ValueError(
                f"key rule {self.model!r} <-> {self.file!r}: both templates need the same fields, "
                f"got {sorted(model_names)} and {sorted(file_names)}"
            )
        object.__setattr__(self, "_model_re", model_re)
        object.__setattr__(self, "_file_re", file_re)

    def to_file(self, key: str) -> str | None:
        m = self._model_re.match(key)
        return None if m is None else self.file.format(**m.groupdict())

    def to_model(self, key: str) -> str | None:
        m = self._file_re.match(key)
        return None if m is None else self.model.format(**m.groupdict())


@dataclass(frozen=True)
class KeyMapping:
    """Ordered :class:`KeyRule`s. ``passthrough``: a key no rule matches keeps its name."""

    rules: tuple[KeyRule, ...] = ()
    passthrough: bool = True

    @classmethod
    def of(cls, pairs: Sequence[tuple[str, str] | KeyRule], passthrough: bool = True) -> KeyMapping:
        return cls(tuple(p if isinstance(p, KeyRule) else KeyRule(*p) for p in pairs), passthrough)

    def _find_model(self, key: str) -> tuple[str, KeyRule | None]:
        for rule in self.rules:
            out = rule.to_file(key)
            if out is not None:
                return out, rule
        if not self.passthrough:
            raise KeyError(f"no key rule maps the model's key {key!r} (and passthrough=False)")
        return key, None

    def to_file(self, key: str) -> str:
        """The checkpoint's name for the model's ``key``."""
        return self._find_model(key)[0]

    def row_order(self, key: str, shape: torch.Size) -> torch.Tensor | None:
        """``perm`` with ``model_tensor = file_tensor[perm]`` for the model's ``key``, or None."""
        rule = self._find_model(key)[1]
        if rule is None or rule.rows is None:
            return None
        perm = rule.rows(shape)
        if perm.shape != (shape[0],) or not torch.equal(perm.sort().values, torch.arange(shape[0])):
            raise ValueError(f"the row order of {key!r} must be a permutation of range({shape[0]}), got {perm.tolist()}")
        return perm

    def to_model(self, key: str) -> str:
        """The model's name for the checkpoint's ``key``."""
        for rule in self.rules:
            out = rule.to_model(key)
            if out is not None:
                return out
        if not self.passthrough:
            raise KeyError(f"no key rule maps the checkpoint's key {key!r} (and passthrough=False)")
        return key


IDENTITY = KeyMapping()


def interleaved_to_halves(head_size: int) -> RowOrder:
    """Rows of a q/k projection whose rotary pairs are ``(2i, 2i+1)`` in the model and
    ``(i, i + head_size/2)`` in the file (Hugging Face's ``rotate_half``), head by head."""
    if head_size % 2:
        raise ValueError(f"head_size ({head_size}) must be even for rotary embeddings")

    def order(shape: torch.Size) -> torch.Tensor:
        if shape[0] % head_size:
            raise ValueError(f"{shape[0]} rows are not a whole number of heads of size {head_size}")
        half = head_size // 2
        within = torch.stack([torch.arange(half), torch.arange(half) + half], dim=1).reshape(-1)  # 0, h, 1, h+1, ...
        heads = torch.arange(shape[0] // head_size).unsqueeze(1) * head_size
        return (heads + within).reshape(-1)

    return order
