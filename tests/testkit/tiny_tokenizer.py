"""A small byte-level BPE tokenizer trained in memory, saved beside tiny checkpoints.

Byte-level, so any text (multi-byte characters included) round-trips, and
multi-byte characters can be split across tokens (what detokenization tests need).
"""
from __future__ import annotations

from pathlib import Path

CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Hello, my name is Ada and I like paged attention and continuous batching.",
    "Once upon a time there was a tiny model that generated random tokens.",
    "héllo wörld — naïve café, 日本語のテキスト, emoji 🙂🚀 and ünïcödé.",
    "def forward(input_ids, positions, kv_caches, attn_metadata): return hidden",
] * 20

SPECIALS = ["<unk>", "<s>", "</s>"]


def make_tiny_tokenizer(path: str | Path, vocab_size: int = 320):
    """Train, save into `path` (tokenizer.json + config), and return a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")
    fast.save_pretrained(str(path))
    return fast
