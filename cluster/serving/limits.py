"""Bounds on what a client sends, applied where it is parsed, before any work.

A value the engine, the core's wire (msgpack) or the tokenizer could not hold is refused here with
a ValueError naming the field (HTTP 400, gRPC INVALID_ARGUMENT), never found later in a state where
the request is already admitted. Shared by the gRPC and HTTP servers; the numeric ranges of the
sampling fields live in `SamplingParams` and the engine-relative ones in `core.validation`.

Fairness (one client cannot take the batch): a request's n completions each hold a batch seat
(`max_num_seqs`) from their first token to their last, and the scheduler does not preempt running
sequences for a newcomer. So a call may hold at most half the seats (`max_seats_per_call`): n, and
prompts x n for an HTTP call with several prompts. Another client's request then always finds a
free seat and runs beside the big one, at the step time of the shared batch, instead of waiting for
it to finish (benchmarks/fairness_n.py measures it).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
from typing import Any, Callable, TypeVar

from pagedray.cluster.core.messages import EngineInfo

T = TypeVar("T")

MAX_N = 256                   # completions per call over any endpoint (also capped by the seats)
MAX_JSON_DEPTH = 32           # the deepest OpenAI body nests ~6 levels (tools schemas a few more)
MAX_QUEUED_RENDERS = 64       # chat renders waiting for the template thread; more is a 429


class QueueFullError(RuntimeError):
    """An admission limit is reached: retry later (gRPC RESOURCE_EXHAUSTED, HTTP 429)."""


# -- text -----------------------------------------------------------------------------------------
def encodable(text: str) -> bool:
    """UTF-8 can carry it: JSON's "\\ud800" escapes make lone surrogates, which no tokenizer,
    protobuf string or msgpack message accepts."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_text(field: str, text: str) -> None:
    if not encodable(text):
        bad = next(i for i, ch in enumerate(text) if 0xD800 <= ord(ch) <= 0xDFFF)
        raise ValueError(f"{field} must be valid Unicode text: it holds a lone surrogate "
                         f"(\\u{ord(text[bad]):04x} at character {bad})")


# -- JSON bodies -----------------------------------------------------------------------------------
def parse_json(raw: bytes | str) -> Any:
    """A JSON body, its nesting bounded and every string valid Unicode; ValueError naming the path."""
    try:
        body = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"the request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise ValueError(f"the request body is not valid JSON: nested deeper than {MAX_JSON_DEPTH} "
                         "levels") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"the request body is not valid JSON: not UTF-8 ({exc.reason} at byte "
                         f"{exc.start})") from None
    check_json(body)
    return body


def check_json(value: Any) -> None:
    """Walks a parsed body without recursion: too deep, or a string (key or value) with a lone
    surrogate, raises ValueError naming where (`messages[0].content`)."""
    stack: list[tuple[Any, str, int]] = [(value, "", 0)]
    while stack:
        item, path, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise ValueError(f"{path or 'the request body'} is nested deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(item, str):
            check_text(path or "the request body", item)
        elif isinstance(item, dict):
            for key, child in item.items():
                check_text(f"a key of {path or 'the request body'}", key)
                stack.append((child, f"{path}.{key}" if path else key, depth + 1))
        elif isinstance(item, list):
            stack.extend((child, f"{path}[{i}]", depth + 1) for i, child in enumerate(item))


# -- fairness --------------------------------------------------------------------------------------
def max_seats_per_call(info: EngineInfo | None) -> int:
    """The completions one call may run at once: half the batch seats (MAX_N when not told)."""
    seats = getattr(info, "max_num_seqs", 0) if info is not None else 0
    return min(MAX_N, max(1, seats // 2)) if seats else MAX_N


def check_seats(n: int, num_prompts: int, info: EngineInfo | None) -> None:
    limit = max_seats_per_call(info)
    if n > limit:
        raise ValueError(f"n must be <= {limit} (half of max_num_seqs={info.max_num_seqs}, so one call "
                         f"cannot take the whole batch), got {n}" if limit < MAX_N else
                         f"n must be <= {MAX_N}, got {n}")
    if num_prompts * n > limit:
        raise ValueError(f"prompt: {num_prompts} prompts x n={n} completions exceed {limit}, the "
                         f"completions one call may run at once")


# -- chat ------------------------------------------------------------------------------------------
def chat_text_bytes(messages: Any) -> int:
    """The UTF-8 bytes of every message's text (contents and text parts); shapes that are not
    messages count 0 here and are refused by the renderer."""
    size = 0
    for message in messages if isinstance(messages, list) else ():
        content = message.get("content") if isinstance(message, dict) else None
        parts = content if isinstance(content, list) else [content]
        for part in parts:
            text = part.get("text") if isinstance(part, dict) else part
            if isinstance(text, str):
                size += len(text.encode("utf-8", "surrogatepass"))
    return size


def check_chat_size(messages: Any, input_processor) -> None:
    """The completions' byte bound on a conversation, before it is rendered: its text alone
    needs more tokens than max_model_len (the template only adds); nor may it hold more messages
    than max_model_len tokens (a template writes at least a role marker for each)."""
    if input_processor is None:
        return
    max_len = input_processor.info.max_model_len
    if isinstance(messages, list) and len(messages) > max_len:
        raise ValueError(f"messages holds {len(messages)} messages, more than max_model_len={max_len} "
                         "tokens can hold")
    input_processor.check_byte_size(chat_text_bytes(messages), "messages")


class BoundedPool:
    """Threads for blocking work (chat templates, tokenizing) with a bound on what may wait:
    past `max_waiting` calls queued or running, a new one is refused (QueueFullError), so a flood
    of large conversations cannot hold every later caller behind it."""

    def __init__(self, workers: int, max_waiting: int, name: str) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix=name)
        self.max_waiting, self.name = max_waiting, name
        self.waiting = 0

    async def run(self, fn: Callable[..., T], *args) -> T:
        if self.waiting >= self.max_waiting:
            raise QueueFullError(f"{self.waiting} {self.name} calls are already waiting "
                                 f"(at most {self.max_waiting}): retry later")
        self.waiting += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        finally:
            self.waiting -= 1

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
