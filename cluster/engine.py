"""LLMEngine: the offline, synchronous engine = an in-process EngineCore + the front's per-request
side (InputProcessor: tokenize and validate; OutputProcessor: detokenize, stop strings, n > 1).

`LLM` drives it. The serving path runs the same two processors in the `Frontend`, over cores
that live in their own processes.
"""
from __future__ import annotations

import logging
from typing import Iterable

from pagedray.cluster.config import EngineConfig, build_engine_config
from pagedray.cluster.core.engine_core import EngineCore
from pagedray.cluster.core.messages import EngineStats
from pagedray.cluster.outputs import RequestOutput
from pagedray.common.errors import EngineDeadError
from pagedray.common.lora import LoRARequest
from pagedray.cluster.serving.input_processor import InputProcessor, load_tokenizer
from pagedray.cluster.serving.output_processor import OutputProcessor
from pagedray.common.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

__all__ = ["LLMEngine", "EngineDeadError", "EngineStats"]


class LLMEngine:
    def __init__(self, config: EngineConfig, tokenizer=None) -> None:
        self.config = config
        self.model_config = config.model
        self.core = EngineCore(config)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.model.model,
                                                                                 config.model.tokenizer)
        self.input_processor = InputProcessor(self.tokenizer, self.core.info)
        self.output_processor = OutputProcessor(self.tokenizer)
        # Requests the core refused after taking them (e.g. a grammar that does not compile): id -> why.
        self.refused: dict[str, str] = {}

    @classmethod
    def from_kwargs(cls, model: str, **kwargs) -> "LLMEngine":
        return cls(build_engine_config(model, **kwargs))

    # The core's parts, for tests and benchmarks that look inside.
    executor = property(lambda self: self.core.executor)
    scheduler = property(lambda self: self.core.scheduler)
    num_kv_blocks = property(lambda self: self.core.info.num_kv_blocks)
    eos_token_ids = property(lambda self: self.input_processor.eos_token_ids)
    dead = property(lambda self: self.core.dead)
    async_scheduling = property(lambda self: self.core.async_scheduling)

    # -- requests ------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | dict, params: SamplingParams | None = None,
                    lora_request: LoRARequest | None = None, final_only: bool = False) -> None:
        """Validate and queue a request; raises ValueError naming the bad field (or adapter).

        final_only: the caller reads only the finished request (LLM.generate); where its outputs need
        no text per step (no stop strings), the core then sends its tokens when it finishes instead
        of one delta per step (CoreRequest.final_only)."""
        self._check_alive()
        if request_id in self.output_processor.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        text, request = self.input_processor.process(request_id, prompt, params, lora_request=lora_request)
        if lora_request is not None:
            self.core.add_lora(lora_request)   # a bad adapter raises here, before anything is queued
        self.output_processor.add_request(request_id, text, request.prompt_token_ids, request.params)
        request.final_only = final_only and not request.params.stop
        self.core.add([request])

    def add_lora(self, lora_request: LoRARequest) -> bool:
        return self.core.add_lora(lora_request)

    def remove_lora(self, lora_int_id: int) -> bool:
        return self.core.remove_lora(lora_int_id)

    def list_loras(self) -> list[int]:
        return self.core.list_loras()

    def abort_request(self, request_id: str | Iterable[str]) -> None:
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        self.output_processor.abort_requests(ids)
        self.core.abort(ids)

    def has_unfinished_requests(self) -> bool:
        return self.output_processor.has_unfinished_requests()

    # -- the loop ------------------------------------------------------------
    def step(self, finished_only: bool = False) -> list[RequestOutput]:
        """Run one engine step; return cumulative outputs of the requests that advanced.

        finished_only: return only those that finished in this step (the bookkeeping is the
        same); for callers such as `LLM.generate` that read nothing else, it saves building an
        output object, with a copy of every token so far, per running request per step.
        """
        self._check_alive()
        processed = self.output_processor.process_outputs(self.core.step().outputs)
        if processed.reqs_to_abort:
            self.core.abort(processed.reqs_to_abort)   # stop strings, found here
        for state in processed.advanced:
            if state.error is not None:
                logger.warning("request %s refused by the engine core: %s", state.request_id, state.error)
                self.refused[state.request_id] = state.error
        return [s.make_output(delta=False) for s in processed.advanced if s.finished or not finished_only]

    # -- health and stats ----------------------------------------------------
    def _check_alive(self) -> None:
        if self.core.dead is not None:
            raise EngineDeadError(f"the engine has failed: {self.core.dead}")

    def get_stats(self) -> EngineStats:
        return self.core.get_stats()

    def shutdown(self) -> None:
        self.core.shutdown()
