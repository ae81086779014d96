"""Which request fields the OpenAI endpoints take, and the constraint fields' translation.

Every field a request may carry is listed here: OpenAI's, vLLM's extras, and a few accepted and
ignored (documented in the README). Anything else is a 400 naming it, as OpenAI answers, so a
client never gets unconstrained text for a field we dropped. `response_format` (OpenAI) and
`structured_outputs` (vLLM) become one `StructuredOutputsParams`.
"""
from __future__ import annotations

from typing import Any

from pagedray.common.sampling_params import StructuredOutputsParams

_SHARED = {"model", "n", "stream", "stream_options", "temperature", "top_p", "seed", "stop", "max_tokens",
           "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "response_format",
           # vLLM's extras
           "top_k", "min_p", "repetition_penalty", "min_tokens", "ignore_eos", "stop_token_ids",
           "skip_special_tokens", "structured_outputs", "prompt_logprobs",
           # accepted and ignored: OpenAI's end-user id (abuse monitoring) changes no output
           "user"}
COMPLETION_FIELDS = _SHARED | {"prompt", "echo", "best_of", "suffix"}
CHAT_FIELDS = _SHARED | {"messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice",
                         "parallel_tool_calls", "add_generation_prompt", "chat_template_kwargs"}
# Known OpenAI fields this server does not implement: a 400 that says so when set.
UNSUPPORTED = ("suffix", "best_of", "functions", "function_call", "audio", "prediction", "modalities",
               "reasoning_effort", "web_search_options")


def unknown_fields(body: dict, known: set[str]) -> list[str]:
    return sorted(name for name in body if name not in known and name not in UNSUPPORTED)


def structured_outputs(body: dict) -> tuple[StructuredOutputsParams | None, str | None]:
    """The request's constraint and the field that set it (for naming it in a 400), from
    OpenAI's `response_format` or vLLM's `structured_outputs` (not both). ValueError names the field."""
    fmt = body.get("response_format")
    from_format = _response_format(fmt) if fmt is not None else None
    extra = body.get("structured_outputs")
    if extra is not None:
        if from_format is not None:
            raise ValueError("response_format and structured_outputs both constrain the output: set one")
        try:
            return StructuredOutputsParams.coerce(extra), "structured_outputs"
        except TypeError as exc:
            raise ValueError(f"structured_outputs: {exc}") from None
    return from_format, "response_format" if from_format is not None else None


def _response_format(fmt: Any) -> StructuredOutputsParams | None:
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise ValueError("response_format must be {\"type\": \"text\"}, {\"type\": \"json_object\"} or "
                         "{\"type\": \"json_schema\", \"json_schema\": {\"name\": ..., \"schema\": {...}}}")
    kind = fmt["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise ValueError("response_format.json_schema must be an object with a name and a schema")
    if "strict" in spec and spec["strict"] is not None and not isinstance(spec["strict"], bool):
        raise ValueError(f"response_format.json_schema.strict must be a boolean, got {spec['strict']!r}")
    # strict or not, the output follows the schema: the grammar allows nothing else.
    schema = spec.get("schema", {"type": "object"})
    try:
        return StructuredOutputsParams(json=schema)
    except ValueError as exc:
        raise ValueError(f"response_format.json_schema.schema: {exc}") from None
