"""HF transformers as the oracle: greedy tokens and, per step, the top-2 logprobs for one prompt."""
from __future__ import annotations

import torch

from testkit.hf_compare import Greedy, top_steps


@torch.no_grad()
def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int, ignore_eos: bool = False) -> Greedy:
    """Greedy continuation by HF `generate`; with `ignore_eos`, HF's cache-less forward token by token
    (eos is then an ordinary token, as in an engine request with ignore_eos)."""
    if ignore_eos:
        return _hf_greedy_no_eos(model, prompt_ids, max_new_tokens)
    inp = torch.tensor([prompt_ids])
    out = model.generate(inp, attention_mask=torch.ones_like(inp), max_new_tokens=max_new_tokens,
                         do_sample=False, output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[0, len(prompt_ids):].tolist()
    return Greedy(tokens, top_steps(torch.stack([step[0] for step in out.logits]), tokens))


def _hf_greedy_no_eos(model, prompt_ids: list[int], max_new_tokens: int) -> Greedy:
    ids, rows = list(prompt_ids), []
    device = next(model.parameters()).device
    for _ in range(max_new_tokens):
        rows.append(model(torch.tensor([ids], device=device)).logits[0, -1].float().cpu())
        ids.append(int(rows[-1].argmax()))
    tokens = ids[len(prompt_ids):]
    return Greedy(tokens, top_steps(torch.stack(rows), tokens))
