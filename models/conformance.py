"""The conformance table: a tiny HF config for every registered architecture.

`tests/models/test_conformance.py` runs every row against HF transformers
(greedy tokens and logprobs through the engine at TP=1, logits at TP=2 over
gloo, a dummy-weight load, strict-load failures). A registered architecture
without a row fails that test, so a model cannot be registered silently.

TABLE FORMAT (one entry per architecture):

    "OPTForCausalLM": {                      # key: the registry's HF `architectures` name
        "base": dict(hidden_size=64, ...),   # case name -> keyword arguments of the HF config
        "proj_post_ln": dict(...),           # more cases for variants the model file branches on
    },

- The config class is the one HF transformers pairs with the architecture
  (`transformers.<arch>.config_class`); the kwargs use that class's own field
  names (`n_embd` for GPT-2, `hidden_size` for Llama, ...).
- Keep a case tiny, so the whole kit stays fast on a 2-core CPU: hidden 64,
  2 layers, vocab 128-512, intermediate <= 256, max positions 128.
- Every case must shard over 2 ranks: heads, KV heads (or 1), intermediate
  size and expert count even.
- Use `initializer_range`-style fields (or the kit's default) large enough that
  logits are spread out; the kit also randomises norm scales and biases.
- One case per code path the model file branches on (e.g. tied vs untied
  head, parallel vs serial residual), not per real-world checkpoint.
"""
from __future__ import annotations

from typing import Any

# Shared by the Llama-family rows (dict(_LLAMA_BASE, field=...) overrides a field).
_LLAMA_BASE = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                   initializer_range=0.3, bos_token_id=1, eos_token_id=2)

_OPT_BASE = dict(vocab_size=320, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=128, init_std=0.3, bos_token_id=1, eos_token_id=2, pad_token_id=0)
_GPT2_BASE = dict(vocab_size=320, n_embd=64, n_layer=2, n_head=4, n_positions=128, initializer_range=0.3,
                  bos_token_id=1, eos_token_id=2)
# rotary_pct 0.25 of a 16-wide head: 4 rotated channels, 12 passed through.
_NEOX_BASE = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=128, initializer_range=0.3,
                  bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)

CONFORMANCE: dict[str, dict[str, dict[str, Any]]] = {
    "LlamaForCausalLM": {
        "gqa_untied": dict(_LLAMA_BASE, tie_word_embeddings=False),
        "mha_tied_bias": dict(_LLAMA_BASE, num_key_value_heads=4, tie_word_embeddings=True,
                              attention_bias=True, mlp_bias=True),
    },
    "MistralForCausalLM": {
        "sliding_window": dict(_LLAMA_BASE, sliding_window=5, tie_word_embeddings=False),
    },
    # Sliding window on layer 1 only (layers >= max_window_layers slide), smaller than the prompts.
    "Qwen2ForCausalLM": {
        "tied_sliding_top_layer": dict(_LLAMA_BASE, tie_word_embeddings=True, use_sliding_window=True,
                                       sliding_window=5, max_window_layers=1),
    },
    # heads * head_dim (128) != hidden (64); one KV head, replicated over 2 ranks; bias on q/k/v and o.
    "Qwen3ForCausalLM": {
        "head_dim_mqa_bias": dict(_LLAMA_BASE, head_dim=32, num_key_value_heads=1, attention_bias=True,
                                  tie_word_embeddings=False),
    },
    # initializer 0.2: sqrt(hidden)-scaled embeddings and (1+w) norms make 0.3 logits large for 1e-4.
    "GemmaForCausalLM": {
        "mqa_head_dim_tied": dict(_LLAMA_BASE, head_dim=32, num_key_value_heads=1, initializer_range=0.2,
                                  hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True, pad_token_id=0),
    },
    # Half of each head rotated (Phi-4-mini style), a sliding window smaller than the prompts.
    "Phi3ForCausalLM": {
        "partial_rotary_sliding": dict(_LLAMA_BASE, sliding_window=6, pad_token_id=None, tie_word_embeddings=False,
                                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                        "partial_rotary_factor": 0.5}),
    },
    "MixtralForCausalLM": {
        "top2_of_4_sliding": dict(_LLAMA_BASE, num_local_experts=4, num_experts_per_tok=2, sliding_window=7,
                                  tie_word_embeddings=False),
    },
    "OPTForCausalLM": {
        "pre_norm_tied": dict(_OPT_BASE),
        # OPT-350m: 32-wide embeddings projected in/out of the 64-wide decoder, post-norm layers.
        "350m_shape": dict(_OPT_BASE, word_embed_proj_dim=32, do_layer_norm_before=False),
        "untied_no_bias": dict(_OPT_BASE, tie_word_embeddings=False, enable_bias=False),
    },
    "GPT2LMHeadModel": {
        "tied": dict(_GPT2_BASE),
        "untied_layer_scaled": dict(_GPT2_BASE, tie_word_embeddings=False, scale_attn_by_inverse_layer_idx=True,
                                    n_inner=96, activation_function="gelu"),
    },
    "GPTNeoXForCausalLM": {
        "parallel_residual": dict(_NEOX_BASE, use_parallel_residual=True),
        "serial_residual_tied": dict(_NEOX_BASE, use_parallel_residual=False, tie_word_embeddings=True,
                                     rope_parameters={"rope_type": "default", "rope_theta": 1000.0,
                                                      "partial_rotary_factor": 0.5}),
    },
}


def conformance_cases() -> list[tuple[str, str]]:
    """Every (architecture, case name) pair of the table, in table order."""
    return [(arch, case) for arch, cases in CONFORMANCE.items() for case in cases]


def tiny_config(arch: str, case: str):
    """The HF config of one table case, with `architectures=[arch]` set."""
    import transformers
    if arch not in CONFORMANCE:
        raise ValueError(f"architecture {arch!r} has no row in models/conformance.py CONFORMANCE")
    if case not in CONFORMANCE[arch]:
        raise ValueError(f"architecture {arch!r} has no conformance case {case!r}; "
                         f"cases: {sorted(CONFORMANCE[arch])}")
    model_cls = getattr(transformers, arch, None)
    if model_cls is None:
        raise ValueError(f"transformers {transformers.__version__} has no class {arch!r} to check against")
    config = model_cls.config_class(**CONFORMANCE[arch][case])
    config.architectures = [arch]
    return config
