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
from pagedray.cluster.serving import openai_fields
from pagedray.cluster.serving.tool_calls import ParsedMessage, ToolRequest, ToolStream, extract
from pagedray.common.sampling_params import SamplingParams

# Fields passed straight to SamplingParams (vLLM's extras included); SamplingParams checks them.
_SAMPLING = ("temperature", "top_p", "n", "seed", "stop", "presence_penalty", "frequency_penalty",
             "top_k", "min_p", "repetition_penalty", "min_tokens", "ignore_eos", "stop_token_ids",
             "skip_special_tokens")
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
    # echo with max_tokens=0 (scoring a text): one token is generated and not returned.
    echo_only: bool = False
    tools: ToolRequest | None = None
    tool_parser: str | None = None


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


def _common(body: dict, known: set[str], aliases: dict[str, str]) -> tuple[dict, bool, bool]:
    """What completions and chat share: unknown and unsupported fields, streaming, the sampling
    fields (constraints and logit_bias included)."""
    unknown = openai_fields.unknown_fields(body, known)
    if unknown:
        raise OpenAIError(400, f"unknown field(s): {', '.join(unknown)} (this server does not know them; "
                               "see the README for the fields it takes)", param=unknown[0])
    for name in openai_fields.UNSUPPORTED:
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
    try:
        constraint, source = openai_fields.structured_outputs(body)
    except ValueError as exc:
        raise bad_request(exc, body) from exc
    if constraint is not None:
        kwargs["structured_outputs"] = constraint
        aliases["structured_outputs"] = source
    if body.get("logit_bias") is not None:
        kwargs["logit_bias"] = body["logit_bias"]
    prompt_logprobs = _typed(body, "prompt_logprobs", int, f"an integer in [0, {MAX_LOGPROBS}]")
    if prompt_logprobs is not None:
        if not 0 <= prompt_logprobs <= MAX_LOGPROBS:
            raise OpenAIError(400, f"prompt_logprobs must be in [0, {MAX_LOGPROBS}], got {prompt_logprobs}",
                              param="prompt_logprobs")
        if stream:   # (a stream has no place for them: refused rather than dropped)
            raise OpenAIError(400, "prompt_logprobs is not supported with stream: true", param="prompt_logprobs")
        kwargs["prompt_logprobs"] = prompt_logprobs
    return kwargs, stream, include_usage


def _sampling(kwargs: dict, body: dict, aliases: dict[str, str] | None = None) -> SamplingParams:
    try:
        return SamplingParams(**kwargs)
    except ValueError as exc:
        raise bad_request(exc, body, aliases) from exc


def parse_completion(body: dict, served_model: str) -> ParsedRequest:
    check_model(body, served_model)
    aliases = {"prompt_token_ids": "prompt"}
    kwargs, stream, include_usage = _common(body, openai_fields.COMPLETION_FIELDS, aliases)
    if "max_tokens" in body:
        kwargs["max_tokens"] = body["max_tokens"]   # None: the rest of the context, as in vLLM
    logprobs = _typed(body, "logprobs", int, f"an integer in [0, {MAX_LOGPROBS}]")
    if logprobs is not None:
        if not 0 <= logprobs <= MAX_LOGPROBS:
            raise OpenAIError(400, f"logprobs must be in [0, {MAX_LOGPROBS}], got {logprobs}", param="logprobs")
        kwargs["logprobs"] = logprobs
    echo = bool(_typed(body, "echo", bool, "a boolean"))
    echo_only = echo and body.get("max_tokens") == 0 and type(body.get("max_tokens")) is int
    if echo_only:
        kwargs["max_tokens"] = 1   # the engine generates one token; the reply leaves it out
    if echo and logprobs is not None:
        # The prompt's tokens are scored too (the first has no logprob): what evaluation harnesses read.
        kwargs["prompt_logprobs"] = max(logprobs, kwargs.get("prompt_logprobs") or 0)
    prompts = _prompts(body.get("prompt"))
    _check_choices(len(prompts), kwargs.get("n", 1))
    return ParsedRequest(prompts, _sampling(kwargs, body, aliases), stream, include_usage, logprobs, echo,
                         aliases=aliases, echo_only=echo_only)


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


def parse_chat(body: dict, served_model: str, prompt: dict, tools: ToolRequest | None = None,
               tool_parser: str | None = None) -> ParsedRequest:
    """`prompt`: body["messages"] rendered by the ChatRenderer (see `render_error`), with `tools`
    (`tool_calls.parse_tools`) when the request has some."""
    check_model(body, served_model)
    aliases = {"logprobs": "top_logprobs", "prompt": "messages", "prompt_token_ids": "messages"}
    kwargs, stream, include_usage = _common(body, openai_fields.CHAT_FIELDS, aliases)
    _check_chat_options(body)
    constraint = tools.constraint() if tools is not None else None
    if constraint is not None:
        if "structured_outputs" in kwargs:
            raise OpenAIError(400, f"tool_choice {tools.choice} constrains the output, and so does "
                                   f"{aliases['structured_outputs']}: set one", param="tool_choice")
        kwargs["structured_outputs"] = constraint
        aliases["structured_outputs"] = "tools"
    limit = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    kwargs["max_tokens"] = body.get(limit)    # None: the rest of the context
    aliases["max_tokens"] = limit
    wants = _typed(body, "logprobs", bool, "a boolean")
    top = _typed(body, "top_logprobs", int, f"an integer in [0, {MAX_LOGPROBS}]")
    if top is not None and (not wants or not 0 <= top <= MAX_LOGPROBS):
        raise OpenAIError(400, f"top_logprobs must be in [0, {MAX_LOGPROBS}] and needs logprobs: true, "
                               f"got {top}", param="top_logprobs")
    num_logprobs = (top or 0) if wants else None
    if wants and stream and tools is not None:
        raise OpenAIError(400, "logprobs are not supported in a stream with tools (held-back content has "
                               "none to send): drop stream or logprobs", param="logprobs")
    if num_logprobs is not None:
        kwargs["logprobs"] = num_logprobs
    return ParsedRequest([prompt], _sampling(kwargs, body, aliases), stream, include_usage, num_logprobs,
                         aliases=aliases, tools=tools, tool_parser=tool_parser)


def _check_chat_options(body: dict) -> None:
    """vLLM's chat extras this server takes: the generation prompt is always added."""
    if body.get("add_generation_prompt", True) is not True:
        raise OpenAIError(400, "add_generation_prompt: only true is supported", param="add_generation_prompt")
    if body.get("chat_template_kwargs") not in (None, {}):
        raise OpenAIError(400, "chat_template_kwargs is not supported by this server",
                          param="chat_template_kwargs")


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
    tools: ToolStream | None = None   # a streamed chat choice under tools


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
        self.prompt_ids: dict[int, list[int]] = {}
        self.prompt_logprobs: dict[int, list] = {}
        if chat and parsed.tools is not None and parsed.stream:
            for choice in self.choices:
                choice.tools = ToolStream(parsed.tools, parsed.tool_parser)

    def request_ids(self) -> list[str]:
        return [f"{self.id}-{i}" for i in range(len(self.parsed.prompts))]

    # -- bookkeeping --------------------------------------------------------------------------
    def _note_prompt(self, p: int, out: RequestOutput) -> None:
        if out.prompt_token_ids:
            self.prompt_tokens[p] = len(out.prompt_token_ids)
            self.cached_tokens[p] = max(self.cached_tokens.get(p, 0), out.num_cached_tokens)
            self.prompt_ids.setdefault(p, list(out.prompt_token_ids))
        if out.prompt_logprobs is not None and p not in self.prompt_logprobs:
            self.prompt_logprobs[p] = out.prompt_logprobs
        if self.parsed.echo and p not in self.prompt_texts and out.prompt_token_ids:
            prompt = self.parsed.prompts[p]
            self.prompt_texts[p] = prompt if isinstance(prompt, str) else self.strings.decode(out.prompt_token_ids)

    def _visible(self, out: RequestOutput) -> list:
        """The completions as the client sees them: echo with max_tokens=0 hides the one token."""
        if not self.parsed.echo_only:
            return out.outputs
        return [dataclasses.replace(c, text="", token_ids=[], logprobs=[] if c.logprobs is not None else None,
                                    finish_reason=c.finish_reason and "length") for c in out.outputs]

    def add(self, p: int, out: RequestOutput) -> None:
        """Unary: fold one delta of prompt `p` into the choices."""
        self._note_prompt(p, out)
        for c in self._visible(out):
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
            p = i // self.n
            prefix = self.prompt_texts.get(p, "") if self.parsed.echo else ""
            logprobs = self._logprobs(choice.token_ids, choice.logprobs, len(prefix))
            if self.chat:
                message = self._message(choice)
                finish = "tool_calls" if message.get("tool_calls") and choice.finish_reason == "stop" \
                    else choice.finish_reason
                choices.append({"index": i, "message": message, "logprobs": logprobs, "finish_reason": finish})
            else:
                if self.parsed.echo and logprobs is not None:
                    logprobs = _join_logprobs(self._prompt_token_logprobs(p), logprobs)
                choices.append({"index": i, "text": prefix + choice.text, "logprobs": logprobs,
                                "finish_reason": choice.finish_reason})
                if self.parsed.params.prompt_logprobs is not None and not self.parsed.echo:
                    choices[-1]["prompt_logprobs"] = self._prompt_logprobs_extra(p)
        body = {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices, "usage": self.usage()}
        if self.chat and self.parsed.params.prompt_logprobs is not None:
            body["prompt_logprobs"] = self._prompt_logprobs_extra(0)
        return body

    def _message(self, choice: _Choice) -> dict:
        tools = self.parsed.tools
        parsed = extract(choice.text, tools, self.parsed.tool_parser) if tools is not None \
            else ParsedMessage(choice.text)
        message = {"role": "assistant", "content": parsed.content}
        if parsed.tool_calls:
            message["tool_calls"] = parsed.tool_calls
        elif message["content"] is None:
            message["content"] = ""
        return message

    # -- prompt logprobs ------------------------------------------------------------------------
    def _prompt_token_logprobs(self, p: int) -> dict:
        """echo + logprobs: the prompt's tokens in completions' logprobs shape (the first has None)."""
        ids, entries = self.prompt_ids.get(p, []), self.prompt_logprobs.get(p) or []
        num = self.parsed.num_logprobs or 0
        tokens, values, tops, offsets, offset = [], [], [], [], 0
        for k, token_id in enumerate(ids):
            entry = entries[k] if k < len(entries) else None
            token = self.strings.token(token_id)
            tokens.append(token)
            values.append(None if entry is None else _logprob(entry, token_id))
            tops.append(None if entry is None else self._top_dict(token_id, entry, num))
            offsets.append(offset)
            offset += len(token)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}

    def _prompt_logprobs_extra(self, p: int) -> list | None:
        """vLLM's `prompt_logprobs`: per prompt token (the first None) {token id: {logprob, decoded_token}}."""
        entries = self.prompt_logprobs.get(p)
        if entries is None:
            return None
        return [None if e is None else {str(t): {"logprob": _logprob(e, t), "decoded_token": self.strings.token(t)}
                                        for t in e} for e in entries]

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
        for c in self._visible(out):
            i = p * self.n + c.index
            choice = self.choices[i]
            if choice.tools is not None:
                choice.token_ids += c.token_ids
                chunks += self._tool_chunks(i, choice, c)
                continue
            text = c.text
            echo_logprobs = None
            if self.parsed.echo and not choice.started:
                text = self.prompt_texts.get(p, "") + text
                choice.offset = len(text) - len(c.text)
                if self.parsed.num_logprobs is not None:
                    echo_logprobs = self._prompt_token_logprobs(p)
            choice.token_ids += c.token_ids   # kept for usage
            if not text and c.finish_reason is None and not c.logprobs:
                continue   # tokens that end mid-character: their text comes with a later one
            choice.started = True
            logprobs = self._logprobs(c.token_ids, c.logprobs or [], choice.offset)
            if echo_logprobs is not None:
                logprobs = _join_logprobs(echo_logprobs, logprobs)
            choice.offset += len(c.text)
            body = {"delta": {"content": text}} if self.chat else {"text": text}
            chunks.append(self._chunk([{"index": i, **body, "logprobs": logprobs,
                                        "finish_reason": c.finish_reason}]))
        return chunks

    def _tool_chunks(self, i: int, choice: _Choice, c) -> list[dict]:
        """A chat choice under tools: content as it is safe to send; the calls when it ends, as
        OpenAI's tool-call deltas (each call whole: id, name and its arguments in one delta)."""
        stream = choice.tools
        chunks = []
        content = stream.feed(c.text)
        if content:
            chunks.append(self._chunk([{"index": i, "delta": {"content": content}, "logprobs": None,
                                        "finish_reason": None}]))
        if c.finish_reason is None:
            return chunks
        final = stream.finish()
        if final.content:
            chunks.append(self._chunk([{"index": i, "delta": {"content": final.content}, "logprobs": None,
                                        "finish_reason": None}]))
        for k, call in enumerate(final.tool_calls):
            delta = {"tool_calls": [{"index": k, **call}]}
            chunks.append(self._chunk([{"index": i, "delta": delta, "logprobs": None, "finish_reason": None}]))
        finish = "tool_calls" if final.tool_calls and c.finish_reason == "stop" else c.finish_reason
        chunks.append(self._chunk([{"index": i, "delta": {}, "logprobs": None, "finish_reason": finish}]))
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
            tops.append(self._top_dict(token_id, entry, num))
            offsets.append(offset)
            offset += len(token)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}

    def _top_dict(self, token_id: int, entry: dict, num: int) -> dict:
        """Completions' top_logprobs: the sampled token, then the top `num` (vLLM's; logprobs=0 gives
        the sampled token alone)."""
        top = {self.strings.token(token_id): _logprob(entry, token_id)}
        for t, lp in _top(entry, num):
            top.setdefault(self.strings.token(t), lp)
        return top

    def _chat_logprob(self, token_id: int, entry: dict, num: int) -> dict:
        def item(t: int, lp: float) -> dict:
            token = self.strings.token(t)
            return {"token": token, "logprob": lp, "bytes": list(token.encode())}
        return {**item(token_id, _logprob(entry, token_id)),
                "top_logprobs": [item(t, lp) for t, lp in _top(entry, num)]}


def _join_logprobs(prompt: dict, generated: dict) -> dict:
    """The prompt's logprobs (echo) followed by the generated tokens', in completions' shape."""
    return {key: prompt[key] + generated[key] for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
