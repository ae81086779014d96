"""A fake worker for scheduler tests (tests/cluster/core/).

It keeps per-request state from the SchedulerOutput messages exactly as the ModelRunner does, stores
each token id in a fake paged KV cache at its slot, and "samples" a deterministic function of the
context READ BACK THROUGH THE BLOCK TABLE: a wrong block table, a prefix-cache hit on a stale block,
a missed copy-on-write or a bad delta changes the outputs or trips an assertion; `reference` is what
a correct engine generates.
"""
from typing import Iterator, NamedTuple

from pagedray.common.messages import CachedRequestData, ModelRunnerOutput, SchedulerOutput
from pagedray.common.sampling_params import SamplingParams

VOCAB = 50
BS = 4


class CachedRow(NamedTuple):
    """One request of a CachedRequestData, for fakes that apply the columns request by request."""
    req_id: str
    new_token_ids: list[int]
    new_block_ids: list[int]
    num_computed_tokens: int
    block_start: int | None


def cached_rows(data: CachedRequestData) -> Iterator[CachedRow]:
    starts = data.block_starts
    for rid, tokens, blocks, computed in zip(data.req_ids, data.new_token_ids, data.new_block_ids,
                                             data.num_computed_tokens):
        yield CachedRow(rid, tokens, blocks, computed, starts.get(rid))


def cached_data(*rows: tuple) -> CachedRequestData:
    """From (req_id, new_token_ids, new_block_ids, num_computed_tokens[, block_start]) tuples."""
    data = CachedRequestData()
    for row in rows:
        data.append(*row)
    return data


def salt(req_id: str) -> int:
    return sum(map(ord, req_id)) if "#" in req_id else 0   # forked children sample differently


def next_token(req_id: str, ctx: list[int]) -> int:
    return (31 * sum((i + 1) * t for i, t in enumerate(ctx)) + len(ctx) + salt(req_id)) % VOCAB


def reference(req_id: str, prompt: list[int], params: SamplingParams, max_model_len: int) -> list[int]:
    tokens, out = list(prompt), []
    while True:
        tok = next_token(req_id, tokens)
        tokens.append(tok)
        out.append(tok)
        if len(tokens) >= max_model_len or (params.max_tokens is not None and len(out) >= params.max_tokens):
            return out
        if len(out) >= params.min_tokens and (
                (not params.ignore_eos and tok == params.eos_token_id) or tok in params.stop_token_ids):
            return out


class FakeWorker:
    def __init__(self, num_blocks: int, block_size: int = BS, sample_fn=next_token) -> None:
        self.cache = [[None] * block_size for _ in range(num_blocks)]
        self.bs = block_size
        self.sample_fn = sample_fn
        self.reqs: dict[str, dict] = {}

    def execute(self, so: SchedulerOutput) -> ModelRunnerOutput:
        for rid in so.finished_req_ids:
            self.reqs.pop(rid, None)
        for new in so.scheduled_new_reqs:
            assert new.req_id not in self.reqs, "new request data for a request the worker still holds"
            self.reqs[new.req_id] = dict(tokens=list(new.token_ids), blocks=list(new.block_ids),
                                         computed=new.num_computed_tokens, prompt=new.num_prompt_tokens)
        for d in cached_rows(so.scheduled_cached_reqs):
            st = self.reqs[d.req_id]
            st["tokens"] += d.new_token_ids
            st["blocks"] += d.new_block_ids
            st["computed"] = d.num_computed_tokens
        for src, dst in so.blocks_to_copy:
            self.cache[dst] = list(self.cache[src])
        written = set()
        for rid, n in so.num_scheduled_tokens.items():     # all writes first, as the attention layer
            st = self.reqs[rid]
            for p in range(st["computed"], st["computed"] + n):
                slot = (st["blocks"][p // self.bs], p % self.bs)
                assert slot not in written, f"two requests write slot {slot} in one step"
                written.add(slot)
                self.cache[slot[0]][slot[1]] = st["tokens"][p]
        sampled = {}
        for rid, n in so.num_scheduled_tokens.items():
            st = self.reqs[rid]
            end = st["computed"] + n
            ctx = [self.cache[st["blocks"][p // self.bs]][p % self.bs] for p in range(end)]
            assert ctx == st["tokens"][:end], f"{rid}: the cache does not hold the request's tokens"
            if end == len(st["tokens"]):
                sampled[rid] = self.sample_fn(rid, ctx)
        return ModelRunnerOutput(sampled)
