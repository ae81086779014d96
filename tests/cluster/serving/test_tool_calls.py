"""Tool-call parsing for tool_choice auto (each --tool-call-parser on canned model outputs), unary and
streamed through the chat ResponseBuilder, and the request checks of tools / tool_choice."""
from __future__ import annotations

import json

import pytest

from pagedray.cluster.outputs import CompletionOutput, RequestOutput
from pagedray.cluster.serving.openai_protocol import ParsedRequest, ResponseBuilder
from pagedray.cluster.serving.tool_calls import parse_hermes, parse_llama3_json, parse_tools
from pagedray.common.sampling_params import SamplingParams

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
         {"type": "function", "function": {"name": "get_time"}}]

CANNED = {
    "hermes": ('I will look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
               '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
               "I will look."),
    "llama3_json": ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; '
                    '{"name": "get_time", "parameters": {}}', None),
}


def _builder(parser: str, stream: bool) -> ResponseBuilder:
    tools = parse_tools({"tools": TOOLS}, parser)
    parsed = ParsedRequest([{"prompt_token_ids": [1]}], SamplingParams(), stream, False, None,
                           tools=tools, tool_parser=parser)
    return ResponseBuilder(parsed, "m", strings=None, chat=True)


def _pieces(text: str, size: int = 3) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)]


@pytest.mark.parametrize("parser", ["hermes", "llama3_json"])
def test_auto_parses_canned_calls_unary_and_streamed(parser):
    text, content = CANNED[parser]
    unary = _builder(parser, stream=False)
    unary.add(0, RequestOutput("r", None, [1], [CompletionOutput(0, text, [5], finish_reason="stop")], True))
    choice = unary.response()["choices"][0]
    calls = choice["message"]["tool_calls"]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] == content
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [{"city": "Paris"}, {}]
    assert len({c["id"] for c in calls}) == 2 and all(c["id"].startswith("call_") for c in calls)

    streamed = _builder(parser, stream=True)
    chunks = []
    pieces = _pieces(text)
    for k, piece in enumerate(pieces):
        last = k == len(pieces) - 1
        out = RequestOutput("r", None, [1], [CompletionOutput(0, piece, [5], finish_reason="stop" if last else None)],
                            last)
        chunks += streamed.chunks(0, out)
    deltas = [c["choices"][0]["delta"] for c in chunks]
    sent = "".join(d.get("content") or "" for d in deltas)
    assert sent.strip() == (content or "") and "<tool_call>" not in sent and "{" not in sent
    tool_deltas = [t for d in deltas for t in d.get("tool_calls", [])]
    assert [t["index"] for t in tool_deltas] == [0, 1]
    assert [t["function"]["name"] for t in tool_deltas] == ["get_weather", "get_time"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_plain_answers_stay_content():
    assert parse_hermes("Just text <tool_ maybe").tool_calls == []
    assert parse_hermes("<tool_call>{not json</tool_call>").content == "<tool_call>{not json</tool_call>"
    assert parse_llama3_json("Paris is the capital.").content == "Paris is the capital."
    streamed = _builder("hermes", stream=True)
    chunks = streamed.chunks(0, RequestOutput("r", None, [1], [CompletionOutput(0, "Hello <tool", [5])], False))
    assert chunks[0]["choices"][0]["delta"]["content"] == "Hello "   # "<tool" may open a call: held
    chunks = streamed.chunks(0, RequestOutput("r", None, [1], [CompletionOutput(0, "s> done", [5], finish_reason="stop")],
                                              True))
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == "<tools> done"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("body, parser, match", [
    ({"tools": TOOLS, "tool_choice": "auto"}, None, "--tool-call-parser"),
    ({"tools": TOOLS}, None, "--tool-call-parser"),      # auto is the default with tools
    ({"tool_choice": "required"}, "hermes", "needs tools"),
    ({"tools": [{"type": "function"}]}, "hermes", r"tools\[0\]"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "hermes", "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "x"}}}, "hermes", "tool_choice"),
    ({"tools": TOOLS, "parallel_tool_calls": "yes"}, "hermes", "parallel_tool_calls"),
])
def test_bad_tools_are_refused(body, parser, match):
    with pytest.raises(ValueError, match=match):
        parse_tools(body, parser)


def test_required_and_named_constraints():
    required = parse_tools({"tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False}, None)
    schema = required.constraint().json
    assert schema["type"] == "array" and schema["maxItems"] == 1 and len(schema["items"]["anyOf"]) == 2
    named = parse_tools({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
                        None)
    assert named.constraint().json == TOOLS[0]["function"]["parameters"]
    assert parse_tools({"tools": TOOLS, "tool_choice": "none"}, None).constraint() is None
