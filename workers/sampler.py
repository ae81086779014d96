"""Batched sampling on the device: one pass over the step's logits.

Order (vLLM's): logprobs are taken from the raw logits; then penalties,
min_tokens masking, temperature, top-k / top-p / min-p, and a draw. Greedy rows
take the argmax. A seeded request draws from a generator seeded by
(seed, its output position), so its tokens do not depend on the rest of the
batch, on batch order, or on a preemption that recomputes it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pagedray.workers.messages import Logprobs
from pagedray.workers.sampling_params import SamplingParams

_MASK = float("-inf")


@dataclass
class SamplingRow:
    """What the sampler needs of one request at this step."""
    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[Logprobs | None]


class Sampler:
    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def _global_generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed)
            self._generators[device] = gen
        return self._generators[device]

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
        logits = logits.float()
        raw_logprobs = torch.log_softmax(logits, dim=-1)
        logits = apply_penalties(logits, rows)
        logits = mask_min_tokens(logits, rows)
        greedy = torch.tensor([r.params.greedy for r in rows], device=logits.device)
        token_ids = logits.argmax(dim=-1)
        if not bool(greedy.all()):
            probs = filtered_probs(logits, rows)
            drawn = self._draw(probs, rows)
            token_ids = torch.where(greedy, token_ids, drawn)
        token_list = token_ids.tolist()
        logprobs = gather_logprobs(raw_logprobs, token_ids, rows)
        return SamplerOutput(token_list, logprobs)

    def _draw(self, probs: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """Exponential-race sampling: argmax(p / E) with E ~ Exp(1) is a draw from p."""
        noise = torch.empty_like(probs)
        noise.exponential_(generator=self._global_generator(probs.device))
        for i, row in enumerate(rows):
            if row.params.seed is not None and not row.params.greedy:
                gen = torch.Generator(device=probs.device)
                gen.manual_seed(_row_seed(row.params.seed, len(row.output_token_ids)))
                noise[i].exponential_(generator=gen)
        return (probs / noise).argmax(dim=-1)


def _row_seed(seed: int, position: int) -> int:
    # Python's hash of a tuple of ints is stable across processes (no salting for ints).
    return hash((seed, position)) & ((1 << 63) - 1)


def apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """vLLM's definitions: repetition divides positive / multiplies negative logits of
    tokens seen in prompt or output; presence and frequency subtract on output tokens."""
    for i, row in enumerate(rows):
        p = row.params
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(row.prompt_token_ids) | set(row.output_token_ids)),
                                dtype=torch.long, device=logits.device)
            if seen.numel():
                vals = logits[i, seen]
                logits[i, seen] = torch.where(vals > 0, vals / p.repetition_penalty,
                                              vals * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and row.output_token_ids:
            out = torch.tensor(row.output_token_ids, dtype=torch.long, device=logits.device)
            counts = torch.bincount(out, minlength=logits.shape[-1])[: logits.shape[-1]].float()
            logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()
    return logits


def mask_min_tokens(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    for i, row in enumerate(rows):
        p = row.params
        if len(row.output_token_ids) < p.min_tokens:
            banned = list(p.stop_token_ids)
            if p.eos_token_id is not None and not p.ignore_eos:
                banned.append(p.eos_token_id)
            if banned:
                logits[i, banned] = _MASK
    return logits


def filtered_probs(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p, as probabilities per row."""
    device = logits.device
    temps = torch.tensor([r.params.temperature if not r.params.greedy else 1.0 for r in rows],
                         device=device)
    logits = logits / temps[:, None]
    top_k = [r.params.top_k for r in rows]
    top_p = [r.params.top_p for r in rows]
    min_p = [r.params.min_p for r in rows]
    if any(k > 0 for k in top_k) or any(p < 1.0 for p in top_p):
        logits = _top_k_top_p(logits, top_k, top_p)
    probs = torch.softmax(logits, dim=-1)
    if any(m > 0 for m in min_p):
        min_p_t = torch.tensor(min_p, device=device)
        threshold = probs.max(dim=-1, keepdim=True).values * min_p_t[:, None]
        probs = torch.where(probs < threshold, torch.zeros_like(probs), probs)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def _top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    k = torch.tensor([kk if kk > 0 else vocab for kk in top_k], device=logits.device)
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    sorted_logits = sorted_logits.masked_fill(ranks >= k[:, None], _MASK)
    probs = torch.softmax(sorted_logits, dim=-1)
    # Keep the smallest prefix whose mass reaches top_p: drop a token when the mass
    # before it already reaches p (the top token is always kept).
    mass_before = probs.cumsum(dim=-1) - probs
    p = torch.tensor(top_p, device=logits.device)
    sorted_logits = sorted_logits.masked_fill(mass_before >= p[:, None], _MASK)
    return torch.full_like(logits, _MASK).scatter(-1, order, sorted_logits)


def gather_logprobs(raw_logprobs: torch.Tensor, token_ids: torch.Tensor,
                    rows: list[SamplingRow]) -> list[Logprobs | None]:
    want = [r.params.logprobs for r in rows]
    if all(w is None for w in want):
        return [None] * len(rows)
    chosen = raw_logprobs.gather(-1, token_ids[:, None]).squeeze(-1)
    ranks = (raw_logprobs > chosen[:, None]).sum(-1) + 1
    max_n = max((w or 0) for w in want)
    top_vals, top_ids = raw_logprobs.topk(max_n, dim=-1) if max_n else (None, None)
    out: list[Logprobs | None] = []
    chosen_l, ranks_l, ids_l = chosen.tolist(), ranks.tolist(), token_ids.tolist()
    for i, n in enumerate(want):
        if n is None:
            out.append(None)
            continue
        entry = [(ids_l[i], chosen_l[i], ranks_l[i])]
        if n:
            entry += [(t, v, r + 1) for r, (t, v) in
                      enumerate(zip(top_ids[i, :n].tolist(), top_vals[i, :n].tolist()))]
        out.append(entry)
    return out
