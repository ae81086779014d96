"""Requests whose grammar is compiling wait here, out of the scheduler (vLLM's WAITING_FOR_FSM).

The engine core hands each request with `structured_outputs` to `hold`, which starts its compile on
the grammar backend's threads (workers/structured_output.py; cached by source text, so a repeated
schema is ready at once). `ready()`, called at the top of every step, returns the requests whose
grammar has compiled (they join the scheduler then) and those refused: a schema, regex or grammar
that does not compile, or one still compiling after `compile_timeout_s`. The step never waits for a
compile, so a slow or huge grammar delays only its own request.
"""
from __future__ import annotations

import concurrent.futures
import time
from dataclasses import dataclass
from typing import Callable, Iterable

from pagedray.cluster.core.messages import CoreRequest

# A grammar still compiling after this long is refused (its compile thread finishes on its own).
DEFAULT_COMPILE_TIMEOUT_S = 30.0


@dataclass
class _Held:
    request: CoreRequest
    future: concurrent.futures.Future
    deadline: float


class GrammarGate:
    def __init__(self, backend_factory: Callable[[], object],
                 compile_timeout_s: float = DEFAULT_COMPILE_TIMEOUT_S) -> None:
        self._backend_factory = backend_factory
        self._backend = None
        self.compile_timeout_s = compile_timeout_s
        self._held: dict[str, _Held] = {}

    def __bool__(self) -> bool:
        return bool(self._held)

    def needs(self, request: CoreRequest) -> bool:
        return request.params.structured_outputs is not None

    def hold(self, request: CoreRequest) -> None:
        if request.request_id in self._held:
            raise ValueError(f"request_id {request.request_id!r} is already in use")
        if self._backend is None:
            self._backend = self._backend_factory()
        future = self._backend.submit(request.params.structured_outputs)
        self._held[request.request_id] = _Held(request, future, time.monotonic() + self.compile_timeout_s)

    def ready(self) -> tuple[list[CoreRequest], list[tuple[CoreRequest, str]]]:
        """(requests whose grammar compiled, (request, why) for those refused)."""
        if not self._held:
            return [], []
        compiled, refused = [], []
        now = time.monotonic()
        for rid, held in list(self._held.items()):
            future = held.future
            if future.done():
                del self._held[rid]
                exc = future.exception()
                if exc is None:
                    compiled.append(held.request)
                else:
                    refused.append((held.request, str(exc) if isinstance(exc, ValueError)
                                    else f"structured_outputs: the grammar failed to compile: {exc}"))
            elif now >= held.deadline:
                del self._held[rid]
                kind = held.request.params.structured_outputs.kind
                refused.append((held.request, f"structured_outputs.{kind}: still compiling after "
                                f"{self.compile_timeout_s:g} s (compile_timeout_s): simplify it"))
        return compiled, refused

    def wait(self, timeout: float) -> None:
        """Block up to `timeout` for any held compile (an engine with nothing else to run)."""
        if self._held:
            concurrent.futures.wait([h.future for h in self._held.values()], timeout,
                                    return_when=concurrent.futures.FIRST_COMPLETED)

    def abort(self, request_ids: Iterable[str]) -> None:
        """Drop held requests (by request id)."""
        for rid in request_ids:
            self._held.pop(rid, None)
