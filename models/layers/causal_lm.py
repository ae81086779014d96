"""`CausalLM`: the `*ForCausalLM` wrapper every model file shares.

It holds the decoder stack and the LM head (or, when tied, the token
embedding itself), and provides the three entry points of docs/design.md:
`forward`, `compute_logits` and `load_weights` through
`packed_modules_mapping`. A model file only builds its stack and says how
its checkpoint differs from its module tree.

Under pipeline parallelism (models/layers/pipeline.py) only the last stage
holds the LM head; with tied embeddings it also holds the token embedding,
which is its head. `intermediate_names` are the tensors a stage hands the
next (the stack's `forward` returns them as `IntermediateTensors` on every
stage but the last).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable

import torch
from torch import nn

from pagedray.models.layers.attention import AttentionMetadata
from pagedray.models.layers.logits import LogitsProcessor
from pagedray.models.layers.pipeline import IntermediateTensors, PPMissing, current_stage
from pagedray.models.layers.vocab_embedding import ParallelLMHead, VocabParallelEmbedding
from pagedray.models.utils import PackedMapping, load_packed_weights

if TYPE_CHECKING:
    from transformers import PretrainedConfig

Weights = Iterable[tuple[str, Any]]


class CausalLM(nn.Module):
    """A decoder stack plus its LM head. Subclasses set the class attributes and call
    `super().__init__(config, stack, stack's token embedding)`.

    `model_name` and `lm_head_name` are HF's attribute names (GPT-2: "transformer",
    GPT-NeoX: "gpt_neox" and "embed_out"), so checkpoint names are parameter names.
    `tie_default` is HF's default for a config without `tie_word_embeddings`;
    `head_width` the LM head's input width when it is not `hidden_size` (OPT-350m).
    """
    packed_modules_mapping: PackedMapping = {}
    model_name = "model"
    lm_head_name = "lm_head"
    # What passes between pipeline stages, each [num_tokens, hidden_size].
    intermediate_names: tuple[str, ...] = ("hidden_states",)

    def __init__(self, config: PretrainedConfig, model: nn.Module, embed_tokens: VocabParallelEmbedding,
                 tie_default: bool = False, head_width: int | None = None) -> None:
        super().__init__()
        self.config = config
        self.stage = current_stage()
        setattr(self, self.model_name, model)  # registered before the head: a tied weight keeps the stack's name
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", tie_default))
        width = head_width or config.hidden_size
        if not self.stage.is_last:
            setattr(self, self.lm_head_name, PPMissing())
        elif self.tie_word_embeddings:
            setattr(self, self.lm_head_name, _stage_embedding(model, embed_tokens, config.vocab_size, width))
        else:
            setattr(self, self.lm_head_name, ParallelLMHead(config.vocab_size, width))
        self.logits_processor = LogitsProcessor(config.vocab_size)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                attn_metadata: AttentionMetadata,
                intermediate_tensors: IntermediateTensors | None = None) -> torch.Tensor | IntermediateTensors:
        """The last stage's hidden states, or what this stage hands the next (`intermediate_tensors`:
        what the previous stage handed this one; None on the first)."""
        stack = getattr(self, self.model_name)
        if intermediate_tensors is None:
            return stack(input_ids, positions, kv_caches, attn_metadata)
        return stack(input_ids, positions, kv_caches, attn_metadata, intermediate_tensors)

    def empty_intermediate_tensors(self, num_tokens: int, dtype: torch.dtype,
                                   device: torch.device) -> IntermediateTensors:
        """Receive buffers for what the previous stage sends in a step of `num_tokens` tokens."""
        shape = (num_tokens, self.config.hidden_size)
        return IntermediateTensors({name: torch.empty(shape, dtype=dtype, device=device)
                                    for name in self.intermediate_names})

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.logits_processor(getattr(self, self.lm_head_name), hidden_states)

    def skipped_weights(self) -> set[str]:
        """Checkpoint tensors that have no parameter of their own: a tied head is the embedding."""
        return {f"{self.lm_head_name}.weight"} if self.tie_word_embeddings else set()

    def hf_layout(self, weights: Weights) -> Weights:
        """Checkpoint (name, tensor) pairs renamed/transformed into this module tree; override where they differ."""
        return weights

    def load_weights(self, weights: Weights) -> set[str]:
        return load_packed_weights(self, self.hf_layout(weights), self.packed_modules_mapping,
                                   self.skipped_weights())


def _stage_embedding(stack: nn.Module, embed_tokens: nn.Module, vocab_size: int,
                     width: int) -> VocabParallelEmbedding:
    """The tied head of the last stage: the stack's token embedding, built here when the stack left
    it to the first stage (its checkpoint name stays the embedding's)."""
    if not isinstance(embed_tokens, PPMissing):
        return embed_tokens
    name = next(n for n, m in stack.named_modules() if m is embed_tokens)
    embedding = VocabParallelEmbedding(vocab_size, width)
    stack.set_submodule(name, embedding)
    return embedding
