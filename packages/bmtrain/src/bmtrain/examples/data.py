"""A character-level corpus shipped with the package (a short story written for these examples)."""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources

import torch

__all__ = ["CharCorpus"]

_DEFAULT_TEXT = "lighthouse.txt"


@dataclass(frozen=True, eq=False)
class CharCorpus:
    """Text as token ids, one token per distinct character."""

    text: str
    chars: str  # the vocabulary, sorted
    ids: torch.Tensor = field(repr=False)  # (len(text),) int64

    @classmethod
    def from_text(cls, text: str) -> CharCorpus:
        if len(text) < 2:
            raise ValueError(f"a corpus needs at least 2 characters, got {len(text)}")
        chars = "".join(sorted(set(text)))
        index = {c: i for i, c in enumerate(chars)}
        return cls(text, chars, torch.tensor([index[c] for c in text], dtype=torch.long))

    @classmethod
    def packaged(cls, name: str = _DEFAULT_TEXT) -> CharCorpus:
        """One of the texts under ``bmtrain/examples/data``."""
        return cls.from_text(resources.files(__package__).joinpath("data", name).read_text(encoding="utf-8"))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, s: str) -> torch.Tensor:
        index = {c: i for i, c in enumerate(self.chars)}
        missing = sorted(set(s) - index.keys())
        if missing:
            raise ValueError(f"characters {missing} are not in the corpus vocabulary")
        return torch.tensor([index[c] for c in s], dtype=torch.long)

    def decode(self, ids: torch.Tensor) -> str:
        return "".join(self.chars[i] for i in ids.tolist())

    def batch(self, batch_size: int, seq_len: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``batch_size`` random windows: inputs ``(B, T)`` and next-character targets ``(B, T)``."""
        data = self.ids
        if seq_len + 1 > data.numel():
            raise ValueError(f"seq_len ({seq_len}) must be below the corpus length ({data.numel()})")
        starts = torch.randint(0, data.numel() - seq_len, (batch_size,), generator=generator)
        offsets = torch.arange(seq_len + 1)
        windows = data[starts[:, None] + offsets]  # (B, T+1)
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
