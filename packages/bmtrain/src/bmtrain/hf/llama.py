"""The example Llama (``bmtrain.examples.llama``) <-> Hugging Face ``LlamaForCausalLM``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .keys import KeyMapping, KeyRule, interleaved_to_halves

if TYPE_CHECKING:
    from ..examples.llama import LlamaConfig

__all__ = ["llama_example_mapping", "llama_example_hf_config"]


def llama_example_mapping(cfg: LlamaConfig) -> KeyMapping:
    """Keys of ``bmtrain.examples.llama.Llama(cfg)`` -> ``LlamaForCausalLM``'s. The example rotates
    interleaved pairs, Hugging Face rotates halves: q/k rows are reordered head by head."""
    head_size = cfg.n_embd // cfg.n_head
    rope = interleaved_to_halves(head_size)
    layer = "layers.{i}."
    hf = "model.layers.{i}."
    return KeyMapping.of(
        [
            ("tok_embeddings.weight", "model.embed_tokens.weight"),
            KeyRule(layer + "attention.wq.weight", hf + "self_attn.q_proj.weight", rope),
            KeyRule(layer + "attention.wk.weight", hf + "self_attn.k_proj.weight", rope),
            (layer + "attention.wv.weight", hf + "self_attn.v_proj.weight"),
            (layer + "attention.wo.weight", hf + "self_attn.o_proj.weight"),
            (layer + "feed_forward.w1.weight", hf + "mlp.gate_proj.weight"),
            (layer + "feed_forward.w3.weight", hf + "mlp.up_proj.weight"),
            (layer + "feed_forward.w2.weight", hf + "mlp.down_proj.weight"),
            (layer + "attention_norm.weight", hf + "input_layernorm.weight"),
            (layer + "ffn_norm.weight", hf + "post_attention_layernorm.weight"),
            ("norm.weight", "model.norm.weight"),
            ("output.weight", "lm_head.weight"),
        ],
        passthrough=False,
    )


def llama_example_hf_config(cfg: LlamaConfig, **overrides: Any) -> Any:
    """The ``transformers.LlamaConfig`` of the same network (needs transformers)."""
    import transformers

    settings: dict[str, Any] = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.n_embd,
        intermediate_size=cfg.hidden_ffn,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_kv_head,
        max_position_embeddings=cfg.block_size,
        rope_theta=cfg.rope_theta,
        rms_norm_eps=1e-6,  # the example's RMSNorm
        hidden_act="silu",
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    settings.update(overrides)
    return transformers.LlamaConfig(**settings)
