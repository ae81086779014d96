"""First run without any download: build a tiny random Llama with a tiny tokenizer, generate."""
from __future__ import annotations

import tempfile


def make_demo_checkpoint(path: str) -> str:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["The capital of France is Paris."] * 10, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(path)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    return path


def main() -> None:
    from pagedray.cluster import LLM, SamplingParams
    with tempfile.TemporaryDirectory() as path:
        llm = LLM(make_demo_checkpoint(path))
        params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
        for out in llm.generate(["The capital of France is", "Hello"], params):
            print(repr(out.prompt), "->", repr(out.outputs[0].text))


if __name__ == "__main__":
    main()
