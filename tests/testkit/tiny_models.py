"""Tiny random-weight HF checkpoints and hand-built attention metadata for tests.

`make_tiny_llama(path, **overrides)` saves a LlamaForCausalLM (safetensors,
config.json, and a byte-level tokenizer) whose norm scales and biases are
randomised too, so a weight loaded into the wrong place changes the output.
"""
from __future__ import annotations

from pathlib import Path

import torch

LLAMA_DEFAULTS = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      initializer_range=0.3, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                      pad_token_id=None)


@torch.no_grad()
def _perturb_constant_params(model: torch.nn.Module, seed: int) -> None:
    """HF initialises norms to 1 and biases to 0; make them informative."""
    gen = torch.Generator().manual_seed(seed + 1)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
        elif name.endswith(".bias"):
            p.copy_(0.2 * torch.randn(p.shape, generator=gen))


def make_tiny_hf_model(arch: str = "llama", seed: int = 0, **overrides):
    """An in-memory HF model (float32, eval) of `arch` ("llama" or "mistral")."""
    import transformers
    config_cls, model_cls = {"llama": ("LlamaConfig", "LlamaForCausalLM"),
                             "mistral": ("MistralConfig", "MistralForCausalLM")}[arch]
    cfg = dict(LLAMA_DEFAULTS)
    if arch == "mistral":
        cfg["sliding_window"] = None
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**cfg)).float().eval()
    _perturb_constant_params(model, seed)
    return model


def make_tiny_llama(path: str | Path, tokenizer: bool = True, seed: int = 0, arch: str = "llama",
                    max_shard_size: str | None = None, **overrides) -> str:
    """Save a tiny random checkpoint into `path` and return it as a str.

    `overrides` go to LlamaConfig (e.g. num_key_value_heads=4, tie_word_embeddings=True,
    head_dim=32, rope_scaling={...}); `max_shard_size` (e.g. "40KB") writes a sharded
    checkpoint with model.safetensors.index.json.
    """
    model = make_tiny_hf_model(arch, seed, **overrides)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(path), safe_serialization=True, **kwargs)
    if tokenizer:
        from testkit.tiny_tokenizer import make_tiny_tokenizer
        make_tiny_tokenizer(path, model.config.vocab_size)
    return str(path)


def edit_checkpoint(src: str | Path, dst: str | Path, edit) -> str:
    """A copy of single-file checkpoint `src` (config.json + model.safetensors) in `dst`, its tensors
    passed through `edit(dict) -> dict`; returns `dst` as a str."""
    import shutil

    from safetensors.torch import load_file, save_file
    Path(dst).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(src) / "config.json", Path(dst) / "config.json")
    save_file(edit(load_file(Path(src) / "model.safetensors")), Path(dst) / "model.safetensors",
              metadata={"format": "pt"})
    return str(dst)


def copy_as_arch(src: str | Path, dst: str | Path, arch: str) -> str:
    """A copy of checkpoint folder `src` in `dst` whose config.json names `arch` as its architecture (a
    user's out-of-tree model class over the same weights); returns `dst` as a str."""
    import json
    import shutil
    shutil.copytree(src, dst)
    config_path = Path(dst) / "config.json"
    config = json.loads(config_path.read_text())
    config["architectures"] = [arch]
    config_path.write_text(json.dumps(config))
    return str(dst)


def load_hf_model(path: str | Path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def build_attn_metadata(seq_lens: list[int], query_lens: list[int], block_tables: list[list[int]],
                        block_size: int):
    """Metadata for sequences whose last query_lens[i] of seq_lens[i] tokens are new this step.

    Returns (attn_metadata, positions) with positions [T] of the new tokens.
    """
    from pagedray.models.layers.attention import AttentionMetadata
    slots, positions = [], []
    for seq_len, q_len, table in zip(seq_lens, query_lens, block_tables):
        for pos in range(seq_len - q_len, seq_len):
            positions.append(pos)
            slots.append(table[pos // block_size] * block_size + pos % block_size)
    width = max(len(t) for t in block_tables)
    qsl = [0]
    for q in query_lens:
        qsl.append(qsl[-1] + q)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.long),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in block_tables], dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32),
        seq_lens_list=list(seq_lens), query_lens_list=list(query_lens),
        max_query_len=max(query_lens), max_seq_len=max(seq_lens))
    return meta, torch.tensor(positions, dtype=torch.long)


def allocate_block_tables(seq_lens: list[int], block_size: int) -> list[list[int]]:
    """Disjoint, deliberately non-contiguous block ids (interleaved across sequences)."""
    need = [-(-n // block_size) for n in seq_lens]
    tables: list[list[int]] = [[] for _ in seq_lens]
    next_id = 1  # block 0 stays unused so a table padded with 0 never aliases a real block
    for j in range(max(need)):
        for i, n in enumerate(need):
            if j < n:
                tables[i].append(next_id)
                next_id += 1
    return tables


@torch.no_grad()
def prefill_logits(model, config, prompt: list[int], block_size: int = 4) -> torch.Tensor:
    """Logits of one prompt's prefill through a pagedray model (TP=1), on a fresh paged KV cache."""
    from pagedray.models import get_kv_cache_spec
    layers, kv_heads, head = get_kv_cache_spec(config, 1)
    tables = allocate_block_tables([len(prompt)], block_size)
    caches = [torch.zeros(2, 1 + len(tables[0]), kv_heads, block_size, head) for _ in range(layers)]
    meta, positions = build_attn_metadata([len(prompt)], [len(prompt)], tables, block_size)
    return model.compute_logits(model(torch.tensor(prompt), positions, caches, meta))
