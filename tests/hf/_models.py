"""Tiny transformers causal LMs (built from configs: nothing is downloaded) and their batches."""

from __future__ import annotations

from typing import Any

import torch

VOCAB, SEQ = 128, 8
KINDS = ("llama", "qwen2", "gpt2")


def config(kind: str, **overrides: Any) -> Any:
    import transformers as T

    common: dict[str, Any] = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=1, pad_token_id=None)
    if kind == "llama":
        return T.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=64, **common, **overrides)
    if kind == "qwen2":
        return T.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=64, **common, **overrides)
    if kind == "gpt2":
        return T.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
                            attn_pdrop=0.0, **common, **overrides)
    raise ValueError(f"unknown model kind {kind!r}")


def model_class(kind: str) -> Any:
    import transformers as T

    return {"llama": T.LlamaForCausalLM, "qwen2": T.Qwen2ForCausalLM, "gpt2": T.GPT2LMHeadModel}[kind]


def build(kind: str, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """The same random model on every rank (fp32, eval-free: no dropout in these configs)."""
    torch.manual_seed(seed)
    model: torch.nn.Module = model_class(kind)(config(kind, **overrides))
    return model


def token_batch(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(seed))


RTOL, ATOL = 1e-5, 1e-6  # fp32 on the CPU: the same math in another order (sharded reductions)


def close(a: torch.Tensor, b: torch.Tensor, what: str, atol: float = ATOL) -> None:
    """``torch.allclose`` to ``RTOL``/``atol``, with the worst difference in the message."""
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
    if not torch.allclose(a, b, rtol=RTOL, atol=atol):
        raise AssertionError(f"{what}: max abs difference {(a - b).abs().max().item():.3g}")
