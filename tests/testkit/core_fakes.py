"""A fake engine core with EngineCore's API: deterministic tokens, no model.

Token k of a request is (sum(prompt) + 7 * position) % vocab_size, position counted from the
first output token (a request that arrives with output_token_ids continues its own sequence).
It refuses (aborted output with the error) an empty prompt or a token outside the vocabulary, as
the real core does, and a prompt starting with token `crash_token` makes the next step raise.
"""
from __future__ import annotations

import time

from pagedray.cluster.core.messages import CoreOutput, CoreOutputs, CoreRequest, EngineInfo, EngineStats


def fake_token(prompt: list[int], position: int, vocab_size: int) -> int:
    return (sum(prompt) + 7 * position) % vocab_size


class FakeCore:
    def __init__(self, model: str = "fake", vocab_size: int = 320, step_delay_s: float = 0.0,
                 crash_token: int = -1, num_kv_blocks: int = 64, device: str = "cpu",
                 load_format: str = "auto", max_model_len: int = 256, gpu_memory_utilization: float = 0.9) -> None:
        """The last four are LLM(...) keywords a benchmark passes; the fake only accepts them."""
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        self.info = EngineInfo(model=model, tokenizer=model, architecture="Fake", max_model_len=256,
                               vocab_size=vocab_size, block_size=4, num_kv_blocks=num_kv_blocks,
                               tensor_parallel_size=1, eos_token_ids=[])
        self.step_delay_s = step_delay_s
        self.crash_token = crash_token
        self.running: dict[str, tuple[CoreRequest, int]] = {}    # id -> (request, tokens produced)
        self.refused: list[CoreOutput] = []
        self.generated = 0

    @classmethod
    def from_kwargs(cls, model: str, **kwargs) -> "FakeCore":
        return cls(model, **kwargs)

    def add(self, requests: list[CoreRequest]) -> None:
        vocab = self.info.vocab_size
        for r in requests:
            if not r.prompt_token_ids or any(not 0 <= t < vocab for t in r.prompt_token_ids):
                error = f"prompt_token_ids must be non-empty ids in [0, {vocab})"
                self.refused.append(CoreOutput(r.request_id, 0, [], finish_reason="abort", error=error))
                continue
            self.running[r.request_id] = (r, len(r.output_token_ids))

    def abort(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self.running.pop(rid, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self.running or self.refused)

    def step(self) -> CoreOutputs:
        if self.step_delay_s:
            time.sleep(self.step_delay_s)
        outputs, self.refused = self.refused, []
        for rid, (r, done) in list(self.running.items()):
            if r.prompt_token_ids[0] == self.crash_token:
                raise RuntimeError("fake executor failure")
            token = fake_token(r.prompt_token_ids, done, self.info.vocab_size)
            done += 1
            self.generated += 1
            finished = done >= (r.params.max_tokens or 16)
            outputs.append(CoreOutput(rid, 0, [token], finish_reason="length" if finished else None))
            if finished:
                del self.running[rid]
            else:
                self.running[rid] = (r, done)
        return CoreOutputs(outputs=outputs, timestamp=time.time())

    def get_stats(self) -> EngineStats:
        return EngineStats(num_running=len(self.running), num_total_blocks=self.info.num_kv_blocks,
                           num_free_blocks=self.info.num_kv_blocks, generation_tokens_total=self.generated)

    def shutdown(self) -> None:
        pass


def options_reporting_core(model: str, report_to: str, **engine_kwargs):
    """The real EngineCore built from LLM keywords; then the kernel options its worker installed in
    this (core) process are written to `report_to` as JSON. A core factory for settings tests."""
    import dataclasses
    import json

    from pagedray.cluster.core.engine_core import EngineCore
    from pagedray.kernels import options
    core = EngineCore.from_kwargs(model, **engine_kwargs)
    with open(report_to, "w") as f:
        json.dump(dataclasses.asdict(options.current()), f)
    return core
