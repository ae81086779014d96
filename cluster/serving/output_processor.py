"""OutputProcessor: the front's per-request state, fed by the core's per-step deltas.

Per request: incremental detokenization, stop strings (a hit ends the completion with "stop" and
asks the caller to abort it in the core), n > 1 grouping, logprob dicts, and `RequestOutput`s
built on demand, as deltas (what is new since the last one built) or cumulative. The offline
`LLMEngine` and the serving `Frontend` both use it; neither holds any other per-request text state.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterable

from pagedray.cluster.core.messages import CoreOutput, completion_id
from pagedray.cluster.outputs import CompletionOutput, RequestOutput
from pagedray.cluster.serving.detokenizer import IncrementalDetokenizer
from pagedray.common.sampling_params import SamplingParams


def _logprob_dict(entry) -> dict[int, float]:
    return {tok: lp for tok, lp, _ in entry}


@dataclass
class CompletionState:
    index: int
    detokenizer: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None
    # What the last delta built covered: tokens, and the text not yet returned.
    sent_tokens: int = 0
    new_text: str = ""
    finish_sent: bool = False

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class RequestState:
    """One request on the front: its completions' tokens and text so far."""

    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                 params: SamplingParams, tokenizer, arrival_time: float | None = None) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.completions = [
            CompletionState(i, IncrementalDetokenizer(tokenizer, prompt_token_ids, params.skip_special_tokens,
                                                      params.stop),
                            logprobs=[] if params.logprobs is not None else None)
            for i in range(params.n)]
        self.num_unfinished = params.n
        self.num_cached_tokens = 0
        self.prompt_logprobs: list[dict[int, float] | None] | None = None
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.first_token_time: float | None = None
        self.finish_time: float | None = None
        self.error: str | None = None    # the core refused the request (why)

    @property
    def finished(self) -> bool:
        return self.num_unfinished == 0

    def core_ids(self) -> list[str]:
        """The ids the core knows this request's unfinished completions by (for an abort)."""
        if len(self.completions) == 1:
            return [self.request_id]
        return [completion_id(self.request_id, c.index) for c in self.completions if not c.finished]

    # -- applying one core delta -----------------------------------------------
    def apply(self, out: CoreOutput, now: float) -> bool:
        """Apply one completion's delta; True when a stop string ended a completion the core runs on."""
        c = self.completions[out.index]
        if c.finish_reason is not None:
            return False   # e.g. a token drawn before the core applied our abort
        if out.error is not None:
            self.error = out.error
        if self.first_token_time is None and out.new_token_ids:
            self.first_token_time = now
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = [None if e is None else _logprob_dict(e) for e in out.prompt_logprobs]
        if out.num_cached_tokens:
            self.num_cached_tokens = out.num_cached_tokens
        new = out.new_token_ids
        c.token_ids.extend(new)
        if c.logprobs is not None and out.new_logprobs is not None:
            c.logprobs.extend(_logprob_dict(e) for e in out.new_logprobs)
        reason = out.finish_reason
        # Ended by eos or a stop token id: as vLLM, that token's text is not part of the output.
        detokenizer = c.detokenizer
        if detokenizer.can_defer:   # decoded when an output is built (LLM.generate: once, at the end)
            if reason is None:
                detokenizer.defer(new)
                return False
            detokenizer.defer(new[:-1] if reason == "stop" else new, final=True)
            self._finish(c, reason, now)
            return False
        c.new_text += detokenizer.add_tokens(new[:-1] if reason == "stop" else new, final=reason is not None)
        stopped = detokenizer.stopped_on is not None
        if stopped:
            reason = "stop"   # as vLLM: a stop string wins over "length"
        if reason is not None:
            self._finish(c, reason, now)
        return stopped and out.finish_reason is None

    def finish_all(self, reason: str) -> None:
        """End every unfinished completion (an abort, or a failure) with `reason`."""
        now = time.monotonic()
        for c in self.completions:
            if not c.finished:
                self._finish(c, reason, now)

    def _finish(self, c: CompletionState, reason: str, now: float) -> None:
        c.finish_reason = reason
        self.num_unfinished -= 1
        if self.num_unfinished == 0:
            self.finish_time = now

    # -- building outputs ----------------------------------------------------
    def make_output(self, delta: bool) -> RequestOutput:
        """The request as a RequestOutput: cumulative, or (delta) only the completions that changed
        since the last delta built, each with only its new tokens, text and logprobs."""
        completions = []
        for c in self.completions:
            c.new_text += c.detokenizer.flush()
            if not delta:
                completions.append(CompletionOutput(
                    c.index, c.detokenizer.visible_text(c.finished), list(c.token_ids),
                    list(c.logprobs) if c.logprobs is not None else None, c.finish_reason))
                continue
            if c.finish_sent or (c.sent_tokens == len(c.token_ids) and not c.new_text and not c.finished):
                continue
            start, c.sent_tokens = c.sent_tokens, len(c.token_ids)
            text, c.new_text = c.new_text, ""
            c.finish_sent = c.finished
            completions.append(CompletionOutput(
                c.index, text, c.token_ids[start:], c.logprobs[start:] if c.logprobs is not None else None,
                c.finish_reason))
        metrics = {"arrival_time": self.arrival_time}
        if self.first_token_time is not None:
            metrics["first_token_time"] = self.first_token_time
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, completions,
                             finished=self.finished, num_cached_tokens=self.num_cached_tokens,
                             prompt_logprobs=(list(self.prompt_logprobs) if self.prompt_logprobs is not None
                                              else None), metrics=metrics)


@dataclass
class ProcessedOutputs:
    advanced: list[RequestState]      # each request that advanced or finished in the step, once
    reqs_to_abort: list[str]          # core ids whose completion a stop string ended


class OutputProcessor:
    """The unfinished requests of one front, by request id."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.requests: dict[str, RequestState] = {}

    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                    params: SamplingParams, arrival_time: float | None = None) -> RequestState:
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        state = RequestState(request_id, prompt, prompt_token_ids, params, self.tokenizer, arrival_time)
        self.requests[request_id] = state
        return state

    def abort_requests(self, request_ids: Iterable[str]) -> list[RequestState]:
        """Forget requests (their completions end with "abort"); returns those that were known."""
        states = [s for rid in request_ids if (s := self.requests.pop(rid, None)) is not None]
        for state in states:
            state.finish_all("abort")
        return states

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def process_outputs(self, outputs: Iterable[CoreOutput]) -> ProcessedOutputs:
        now = time.monotonic()
        advanced: dict[str, RequestState] = {}
        to_abort: list[str] = []
        requests = self.requests
        for out in outputs:
            state = requests.get(out.request_id)
            if state is None:
                continue   # aborted on this side, or finished by a stop string
            if state.apply(out, now):
                to_abort.append(out.request_id if len(state.completions) == 1
                                else completion_id(out.request_id, out.index))
            advanced[out.request_id] = state
            if state.finished:
                del requests[out.request_id]
        return ProcessedOutputs(list(advanced.values()), to_abort)
