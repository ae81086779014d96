"""Tool calls for /v1/chat/completions: `tools`, `tool_choice`, `parallel_tool_calls`.

- `tool_choice` "required" or a named function: the output is constrained by a JSON schema built
  from the tools' parameters (an array of {name, parameters} objects, or the named function's
  arguments), so the arguments always validate; the JSON then becomes `message.tool_calls`.
- "auto": the model writes free text in its family's tool-call format and a parser chosen with
  `--tool-call-parser` finds the calls: `hermes` (`<tool_call>{"name": .., "arguments": ..}</tool_call>`,
  Qwen 2.5/3, Hermes, SmolLM3-class templates) or `llama3_json` (Llama 3.1/3.2's
  `{"name": .., "parameters": ..}`, optionally after `<|python_tag|>`, several joined by `;`).
- "none": tools go to the template; the output is plain content.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from pagedray.common.sampling_params import StructuredOutputsParams

TOOL_CALL_PARSERS = ("hermes", "llama3_json")
MAX_TOOLS = 128


@dataclass
class ToolRequest:
    tools: list[dict]               # OpenAI's [{"type": "function", "function": {...}}]
    choice: str                     # "none" | "auto" | "required" | "named"
    name: str | None = None         # the named function
    parallel: bool = True

    @property
    def template_tools(self) -> list[dict]:
        return self.tools

    def constraint(self) -> StructuredOutputsParams | None:
        """The grammar of "required" and named choices (None: free text)."""
        if self.choice == "named":
            return StructuredOutputsParams(json=self._parameters(self.name))
        if self.choice != "required":
            return None
        items = [{"type": "object", "properties": {"name": {"type": "string", "enum": [t["function"]["name"]]},
                                                   "parameters": self._parameters(t["function"]["name"])},
                  "required": ["name", "parameters"]} for t in self.tools]
        schema = {"type": "array", "minItems": 1, "items": items[0] if len(items) == 1 else {"anyOf": items}}
        if not self.parallel:
            schema["maxItems"] = 1
        return StructuredOutputsParams(json=schema)

    def _parameters(self, name: str) -> dict:
        for t in self.tools:
            if t["function"]["name"] == name:
                return t["function"].get("parameters") or {"type": "object", "properties": {}}
        raise KeyError(name)


def parse_tools(body: dict, parser: str | None) -> ToolRequest | None:
    """The request's tools and tool_choice, checked; ValueError names the field."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise ValueError(f"parallel_tool_calls must be a boolean, got {parallel!r}")
    if tools is None:
        if choice not in (None, "none"):
            raise ValueError(f"tool_choice {choice!r} needs tools")
        return None
    if not isinstance(tools, list) or not tools or len(tools) > MAX_TOOLS:
        raise ValueError(f"tools must be a list of 1 to {MAX_TOOLS} function tools")
    names = []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ValueError(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ..., "
                             "\"parameters\": {...}}}}")
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise ValueError(f"tools[{i}].function.parameters must be a JSON schema object")
        names.append(fn["name"])
    if choice is None:
        choice = "auto"
    name = None
    if isinstance(choice, dict):
        fn = choice.get("function") if choice.get("type") == "function" else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if name not in names:
            raise ValueError(f"tool_choice must name one of the tools ({', '.join(names)}), got {choice!r}")
        choice = "named"
    elif choice not in ("none", "auto", "required"):
        raise ValueError(f"tool_choice must be none, auto, required or {{\"type\": \"function\", "
                         f"\"function\": {{\"name\": ...}}}}, got {choice!r}")
    if choice == "auto" and parser is None:
        raise ValueError("tool_choice auto needs the server started with --tool-call-parser "
                         f"({' or '.join(TOOL_CALL_PARSERS)}); or set tool_choice to required or a function")
    request = ToolRequest(tools, choice, name, parallel)
    try:
        request.constraint()   # a parameters schema that is no schema: refused here
    except ValueError as exc:
        raise ValueError(f"tools: {exc}") from None
    return request


def new_call(name: str, arguments: Any) -> dict:
    args = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": {"name": name, "arguments": args}}


@dataclass
class ParsedMessage:
    content: str | None
    tool_calls: list[dict] = field(default_factory=list)


def extract(text: str, request: ToolRequest, parser: str | None) -> ParsedMessage:
    """The assistant message of a finished completion under `request`."""
    if request.choice == "named":
        return ParsedMessage(None, [new_call(request.name, text.strip())])
    if request.choice == "required":
        try:
            calls = json.loads(text)
        except ValueError:
            return ParsedMessage(text)   # cut short (max_tokens): no valid call to report
        return ParsedMessage(None, [new_call(c["name"], c["parameters"]) for c in calls])
    if request.choice == "auto":
        return PARSERS[parser](text)
    return ParsedMessage(text)


# -- parsers for "auto" -----------------------------------------------------------------------
_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)


def parse_hermes(text: str) -> ParsedMessage:
    start = text.find("<tool_call>")
    if start < 0:
        return ParsedMessage(text)
    calls = []
    for body in _HERMES.findall(text[start:]):
        try:
            call = json.loads(body)
        except ValueError:
            return ParsedMessage(text)   # not a well-formed call: the text is the answer
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return ParsedMessage(text)
        calls.append(new_call(call["name"], call.get("arguments", {})))
    content = text[:start].strip()
    return ParsedMessage(content or None, calls)


def parse_llama3_json(text: str) -> ParsedMessage:
    body = text.strip()
    if body.startswith("<|python_tag|>"):
        body = body[len("<|python_tag|>"):].strip()
    if not body.startswith("{"):
        return ParsedMessage(text)
    decoder = json.JSONDecoder()
    calls, pos = [], 0
    try:
        while pos < len(body):
            call, end = decoder.raw_decode(body, pos)
            if not isinstance(call, dict) or not isinstance(call.get("name"), str):
                return ParsedMessage(text)
            args = call.get("parameters", call.get("arguments", {}))
            calls.append(new_call(call["name"], args))
            pos = end
            while pos < len(body) and body[pos] in " \n\t;":
                pos += 1
    except ValueError:
        return ParsedMessage(text)
    return ParsedMessage(None, calls)


PARSERS = {"hermes": parse_hermes, "llama3_json": parse_llama3_json}


class ToolStream:
    """One streamed choice under tools: which content may go out now, and the calls at the end.

    Content that may be (the start of) a tool call is held until the completion ends: for
    "required" and named choices all of it, for hermes the text from `<tool_call>` (or a prefix
    of it at the end), for llama3_json a completion that opens with `{` or `<|python_tag|>`.
    """

    def __init__(self, request: ToolRequest, parser: str | None) -> None:
        self.request, self.parser = request, parser
        self.text = ""
        self.sent = 0   # characters of `text` sent as content

    def feed(self, delta: str) -> str:
        """Add generated text; the content that can be sent now."""
        self.text += delta
        end = self._safe_end()
        out = self.text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return out

    def _safe_end(self) -> int:
        choice, text = self.request.choice, self.text
        if choice in ("required", "named"):
            return 0
        if choice != "auto":
            return len(text)
        if self.parser == "hermes":
            marker = "<tool_call>"
            at = text.find(marker)
            if at >= 0:
                return at
            for k in range(len(marker) - 1, 0, -1):
                if text.endswith(marker[:k]):
                    return len(text) - k
            return len(text)
        stripped = text.lstrip()
        tag = "<|python_tag|>"
        if not stripped or stripped.startswith("{") or stripped.startswith(tag) or tag.startswith(stripped):
            return self.sent   # may be a call: hold it (content sent before stays sent)
        return len(text)

    def finish(self) -> ParsedMessage:
        """The completion ended: the content not yet sent and the tool calls."""
        message = extract(self.text, self.request, self.parser)
        if message.tool_calls:
            at = self.text.find("<tool_call>") if self.parser == "hermes" and self.request.choice == "auto" else -1
            rest = self.text[self.sent:at].strip() if at > self.sent else ""
            return ParsedMessage(rest or None, message.tool_calls)
        return ParsedMessage(self.text[self.sent:] or None)


def template_messages(messages: list[dict]) -> list[dict]:
    """Assistant tool calls' arguments as objects, as chat templates expect them (`tojson`)."""
    out = []
    for m in messages:
        calls = m.get("tool_calls")
        if calls:
            m = dict(m)
            m["tool_calls"] = [_template_call(c) for c in calls]
        out.append(m)
    return out


def _template_call(call: dict) -> dict:
    fn = dict(call.get("function") or {})
    if isinstance(fn.get("arguments"), str):
        try:
            fn["arguments"] = json.loads(fn["arguments"])
        except ValueError:
            pass
    return {**call, "function": fn}
