"""OpenAI's completions and chat-completions shapes, to and from the engine's types.

Requests become a `ParsedRequest` (prompts for the frontend, one SamplingParams); delta
RequestOutputs become OpenAI responses and stream chunks (`ResponseBuilder`). No I/O here.
"""
from __future__ import annotations

import dataclasses
import re
import time
import uuid
from typing import Any

from pagedray.cluster.outputs import RequestOutput
from pagedray.cluster.serving.server import MAX_LOGPROBS, MAX_N   # the same limits as over gRPC
from pagedray.cluster.serving.detokenizer import TokenTexts
from pagedray.common.sampling_params import SamplingParams

# Fields passed straight to SamplingParams (vLLM's extras included); SamplingParams checks them.
_SAMPLING = ("temperature", "top_p", "n", "seed", "stop", "presence_penalty", "frequency_penalty",
             "top_k", "min_p", "repetition_penalty", "min_tokens", "ignore_eos", "stop_token_ids",
             "skip_special_tokens")
# Known OpenAI fields this server does not implement: a 400 when set, never silently ignored.
_UNSUPPORTED = ("suffix", "logit_bias", "best_of", "tools", "functions", "function_call", "response_format",
                "audio", "prediction", "prompt_logprobs")


class OpenAIError(Exception):
    """An error answered in OpenAI's JSON shape: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(exc: ValueError, body: dict, aliases: dict[str, str] | None = None) -> OpenAIError:
    """A 400 naming the parameter: our ValueErrors start with the field's name."""
    message = str(exc)
    match = re.match(r"[A-Za-z_]+", message)
    word = match.group(0) if match else ""
    word = (aliases or {}).get(word, word)
    param = word if word in body or word in ("prompt", "messages") else None
    return OpenAIError(400, message, param=param)


@dataclasses.dataclass
class ParsedRequest:
    prompts: list[str | dict]
    params: SamplingParams
    stream: bool
    include_usage: bool
    num_logprobs: int | None   # top logprobs per token; None: no logprobs
    echo: bool = False
    # The frontend's field names -> this request's, for naming `param` in a 400.
    aliases: dict[str, str] = dataclasses.field(default_factory=lambda: {"prompt_token_ids": "prompt"})


def check_model(body: dict, served_model: str) -> None:
    model = body.get("model")
    if model not in (None, "", served_model):
        raise OpenAIError(404, f"The model `{model}` does not exist (this server serves `{served_model}`)",
                          param="model", code="model_not_found")


def _typed(body: dict, name: str, kind: type, rule: str):
    """body[name] if it is exactly of `kind` (JSON `true` is no integer here), None if absent."""
    value = body.get(name)
    if value is not None and type(value) is not kind:
        raise OpenAIError(400, f"{name} must be {rule}, got {value!r}", param=name)
    return value


def _common(body: dict) -> tuple[dict, bool, bool]:
    """What completions and chat share: unsupported fields, streaming, the sampling fields."""
    for name in _UNSUPPORTED:
        if body.get(name) is not None and not (name == "best_of" and body.get(name) == body.get("n", 1)):
            raise OpenAIError(400, f"{name} is not supported by this server", param=name)
    stream = bool(_typed(body, "stream", bool, "a boolean"))
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or not stream):
        raise OpenAIError(400, "stream_options must be an object, and only set when stream is true",
                          param="stream_options")
    include_usage = bool((options or {}).get("include_usage"))
    kwargs = {name: body[name] for name in _SAMPLING if body.get(name) is not None}
    n = kwargs.get("n", 1)
    if isinstance(n, int) and n > MAX_N:
        raise OpenAIError(400, f"n must be <= {MAX_N}, got {n}", param="n")
    return kwargs, stream, include_usage


def _sampling(kwargs: dict, body: dict, aliases: dict[str, str] | None = None) -> SamplingParams:
    try:
        return SamplingParams(**kwargs)
    except ValueError as exc:
        raise bad_request(exc, body, aliases) from exc


def parse_completion(body: dict, served_model: str) -> ParsedRequest:
    check_model(body, served_model)
    kwargs, stream, include_usage = _common(body)
    if "max_tokens" in body:
        kwargs["max_tokens"] = body["max_tokens"]   # None: the rest of the context, as in vLLM
    logprobs = _typed(body, "logprobs", int, f"an integer in [0, {MAX_LOGPROBS}]")
    if logprobs is not None:
        if not 0 <= logprobs <= MAX_LOGPROBS:
            raise OpenAIError(400, f"logprobs must be in [0, {MAX_LOGPROBS}], got {logprobs}", param="logprobs")
        kwargs["logprobs"] = logprobs
    echo = bool(_typed(body, "echo", bool, "a boolean"))
    prompts = _prompts(body.get("prompt"))
    _check_choices(len(prompts), kwargs.get("n", 1))
    return ParsedRequest(prompts, _sampling(kwargs, body), stream, include_usage, logprobs, echo)


def _prompts(prompt: Any) -> list[str | dict]:
    """A string, a list of strings, a list of token ids or a list of token-id lists."""
    def ids(x) -> bool:
        return isinstance(x, list) and bool(x) and all(type(t) is int for t in x)
    if isinstance(prompt, str):
        return [prompt]
    if ids(prompt):
        return [{"prompt_token_ids": prompt}]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    if isinstance(prompt, list) and prompt and all(ids(p) for p in prompt):
        return [{"prompt_token_ids": p} for p in prompt]
    raise OpenAIError(400, "prompt must be a string, a list of strings, a non-empty list of token ids "
                           "or a list of token-id lists", param="prompt")


def _check_choices(num_prompts: int, n: Any) -> None:
    if isinstance(n, int) and num_prompts * n > MAX_N:
        raise OpenAIError(400, f"prompt: {num_prompts} prompts x n={n} choices exceed {MAX_N}", param="prompt")


def parse_chat(body: dict, served_model: str, prompt: dict) -> ParsedRequest:
    """`prompt`: body["messages"] rendered by the ChatRenderer (see `render_error`)."""
    check_model(body, served_model)
    aliases = {"logprobs": "top_logprobs", "prompt": "messages", "prompt_token_ids": "messages"}
    kwargs, stream, include_usage = _common(body)
    tool_choice = body.get("tool_choice")
    if tool_choice not in (None, "none"):
        raise OpenAIError(400, "tool_choice is not supported by this server", param="tool_choice")
    limit = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    kwargs["max_tokens"] = body.get(limit)    # None: the rest of the context
    aliases["max_tokens"] = limit
    wants = _typed(body, "logprobs", bool, "a boolean")
    top = _typed(body, "top_logprobs", int, f"an integer in [0, {MAX_LOGPROBS}]")
    if top is not None and (not wants or not 0 <= top <= MAX_LOGPROBS):
        raise OpenAIError(400, f"top_logprobs must be in [0, {MAX_LOGPROBS}] and needs logprobs: true, "
                               f"got {top}", param="top_logprobs")
    num_logprobs = (top or 0) if wants else None
    if num_logprobs is not None:
        kwargs["logprobs"] = num_logprobs
    return ParsedRequest([prompt], _sampling(kwargs, body, aliases), stream, include_usage, num_logprobs,
                         aliases=aliases)


def render_error(exc: ValueError) -> OpenAIError:
    """A chat template that refused the messages (or is missing): a 400 on `messages`."""
    return OpenAIError(400, str(exc), param="messages")


# -- responses ---------------------------------------------------------------------------------
def _logprob(entry: dict[int, float], token_id: int) -> float:
    value = entry.get(token_id)
    return -9999.0 if value is None or value != value or value == float("-inf") else value   # JSON has no -inf


def _top(entry: dict[int, float], num: int) -> list[tuple[int, float]]:
    return sorted(entry.items(), key=lambda kv: -kv[1])[:num]


@dataclasses.dataclass
class _Choice:
    text: str = ""
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[dict] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    offset: int = 0          # characters sent so far (completion logprobs' text_offset)
    started: bool = False    # first chunk sent (echo, chat role)


class ResponseBuilder:
    """One request's response: accumulates deltas (unary) or turns each into chunks (stream)."""

    def __init__(self, parsed: ParsedRequest, model: str, strings: TokenTexts, chat: bool) -> None:
        self.parsed, self.model, self.strings, self.chat = parsed, model, strings, chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.n = parsed.params.n
        self.choices = [_Choice() for _ in range(len(parsed.prompts) * self.n)]
        self.prompt_tokens: dict[int, int] = {}
        self.cached_tokens: dict[int, int] = {}
        self.prompt_texts: dict[int, str] = {}

    def request_ids(self) -> list[str]:
        return [f"{self.id}-{i}" for i in range(len(self.parsed.prompts))]

    # -- bookkeeping --------------------------------------------------------------------------
    def _note_prompt(self, p: int, out: RequestOutput) -> None:
        if out.prompt_token_ids:
            self.prompt_tokens[p] = len(out.prompt_token_ids)
            self.cached_tokens[p] = max(self.cached_tokens.get(p, 0), out.num_cached_tokens)
        if self.parsed.echo and p not in self.prompt_texts and out.prompt_token_ids:
            prompt = self.parsed.prompts[p]
            self.prompt_texts[p] = prompt if isinstance(prompt, str) else self.strings.decode(out.prompt_token_ids)

    def add(self, p: int, out: RequestOutput) -> None:
        """Unary: fold one delta of prompt `p` into the choices."""
        self._note_prompt(p, out)
        for c in out.outputs:
            choice = self.choices[p * self.n + c.index]
            choice.text += c.text
            choice.token_ids += c.token_ids
            choice.logprobs += c.logprobs or []
            choice.finish_reason = c.finish_reason or choice.finish_reason

    def usage(self) -> dict:
        prompt = sum(self.prompt_tokens.values())
        completion = sum(len(c.token_ids) for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": sum(self.cached_tokens.values())}}

    def response(self) -> dict:
        choices = []
        for i, choice in enumerate(self.choices):
            prefix = self.prompt_texts.get(i // self.n, "") if self.parsed.echo else ""
            logprobs = self._logprobs(choice.token_ids, choice.logprobs, len(prefix))
            if self.chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": choice.text},
                                "logprobs": logprobs, "finish_reason": choice.finish_reason})
            else:
                choices.append({"index": i, "text": prefix + choice.text, "logprobs": logprobs,
                                "finish_reason": choice.finish_reason})
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices, "usage": self.usage()}

    # -- streaming ----------------------------------------------------------------------------
    def _chunk(self, choices: list[dict], usage: dict | None = None) -> dict:
        chunk = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                 "created": self.created, "model": self.model, "choices": choices}
        if self.parsed.include_usage:
            chunk["usage"] = usage
        return chunk

    def first_chunks(self) -> list[dict]:
        """Chat streams open every choice with `role: assistant`."""
        if not self.chat:
            return []
        return [self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}]) for i in range(len(self.choices))]

    def chunks(self, p: int, out: RequestOutput) -> list[dict]:
        """Stream: the chunks for one delta of prompt `p`."""
        self._note_prompt(p, out)
        chunks = []
        for c in out.outputs:
            i = p * self.n + c.index
            choice = self.choices[i]
            text = c.text
            if self.parsed.echo and not choice.started:
                text = self.prompt_texts.get(p, "") + text
                choice.offset = len(text) - len(c.text)
            choice.token_ids += c.token_ids   # kept for usage
            if not text and c.finish_reason is None and not c.logprobs:
                continue   # tokens that end mid-character: their text comes with a later one
            choice.started = True
            logprobs = self._logprobs(c.token_ids, c.logprobs or [], choice.offset)
            choice.offset += len(c.text)
            body = {"delta": {"content": text}} if self.chat else {"text": text}
            chunks.append(self._chunk([{"index": i, **body, "logprobs": logprobs,
                                        "finish_reason": c.finish_reason}]))
        return chunks

    def usage_chunk(self) -> dict | None:
        return self._chunk([], self.usage()) if self.parsed.include_usage else None

    # -- logprobs -------------------------------------------------------------------------------
    def _logprobs(self, token_ids: list[int], entries: list[dict], offset: int) -> dict | None:
        num = self.parsed.num_logprobs
        if num is None:
            return None
        if self.chat:
            return {"content": [self._chat_logprob(t, e, num) for t, e in zip(token_ids, entries)]}
        tokens, values, tops, offsets = [], [], [], []
        for token_id, entry in zip(token_ids, entries):
            token = self.strings.token(token_id)
            tokens.append(token)
            values.append(_logprob(entry, token_id))
            tops.append({self.strings.token(t): lp for t, lp in _top(entry, num)})
            offsets.append(offset)
            offset += len(token)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}

    def _chat_logprob(self, token_id: int, entry: dict, num: int) -> dict:
        def item(t: int, lp: float) -> dict:
            token = self.strings.token(t)
            return {"token": token, "logprob": lp, "bytes": list(token.encode())}
        return {**item(token_id, _logprob(entry, token_id)),
                "top_logprobs": [item(t, lp) for t, lp in _top(entry, num)]}
