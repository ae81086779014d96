"""Chat messages -> one prompt, through the tokenizer's chat template (HF `apply_chat_template`).

Shared by the OpenAI HTTP server, the gRPC `chat` input and `pagedray chat`, so the three render
a conversation the same way. The rendered text is tokenized here without adding special tokens:
templates write their own BOS, and a second one would change what the model sees.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from pagedray.cluster.serving.limits import MAX_QUEUED_RENDERS, BoundedPool, check_chat_size, check_text

ROLES = ("system", "user", "assistant", "tool", "developer")


def load_chat_template(path: str | Path) -> str:
    """A Jinja chat template from a file (`--chat-template FILE`)."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ValueError(f"chat template file {str(path)!r}: cannot read it ({exc.strerror or exc})") from exc
    if not text.strip():
        raise ValueError(f"chat template file {str(path)!r} is empty")
    return text


def normalize_messages(messages: Any) -> list[dict]:
    """OpenAI-style messages as [{'role', 'content'}] with text content; ValueError names the bad one."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {role, content} objects")
    return [_normalize_one(i, m) for i, m in enumerate(messages)]


def _normalize_one(i: int, message: Any) -> dict:
    if not isinstance(message, dict):
        raise ValueError(f"messages[{i}] must be an object with role and content")
    role = message.get("role")
    if role not in ROLES:
        raise ValueError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}")
    content = message.get("content")
    if content is None and role == "assistant":
        content = ""
    if isinstance(content, list):   # content parts: only text is understood by a text model
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"messages[{i}].content[{j}] must be a text part "
                                 "{'type': 'text', 'text': ...} (only text is supported)")
            texts.append(part["text"])
        content = "".join(texts)
    if not isinstance(content, str):
        raise ValueError(f"messages[{i}].content must be a string or a list of text parts")
    check_text(f"messages[{i}].content", content)
    out = {"role": role, "content": content}
    # Tool calls go back through the template: the assistant's calls, the tool's answer to one.
    calls = message.get("tool_calls")
    if calls is not None and role == "assistant":
        if not isinstance(calls, list) or any(not isinstance(c, dict) or not isinstance(c.get("function"), dict)
                                              for c in calls):
            raise ValueError(f"messages[{i}].tool_calls must be a list of {{id, type, function: {{name, "
                             "arguments}}}} objects")
        out["tool_calls"] = calls
    for key in ("tool_call_id", "name"):
        if isinstance(message.get(key), str):
            out[key] = message[key]
    if role == "tool" and "tool_call_id" not in out:
        raise ValueError(f"messages[{i}] (role tool) must have a tool_call_id")
    return out


class ChatRenderer:
    """Renders conversations for one tokenizer; `template` (if given) replaces the tokenizer's own.

    Keeps a private copy of the tokenizer: the engine and the front use theirs from other threads,
    and a Rust-backed tokenizer shared across threads can fail with "Already borrowed".
    """

    def __init__(self, tokenizer: Any, template: str | None = None) -> None:
        self._source = tokenizer
        self._tokenizer: Any = None
        self._pool: BoundedPool | None = None
        self.template = template

    @property
    def has_template(self) -> bool:
        return self.template is not None or bool(getattr(self._source, "chat_template", None))

    def render(self, messages: Any, tools: list[dict] | None = None) -> str:
        """The prompt text for `messages` (and the `tools` the model may call), ending with the
        assistant's generation prompt."""
        from pagedray.cluster.serving.tool_calls import template_messages
        messages = template_messages(normalize_messages(messages))
        if self._source is None:
            raise ValueError("messages: this model has no tokenizer, so chat is not available")
        if not self.has_template:
            raise ValueError("messages: this model's tokenizer has no chat template; "
                             "start the server with --chat-template FILE")
        try:
            return self._own().apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                                   add_generation_prompt=True, tools=tools)
        except Exception as exc:  # a Jinja error in the template (e.g. raise_exception on role order)
            raise ValueError(f"messages: the chat template failed to render them: {exc}") from exc

    def prompt(self, messages: Any, tools: list[dict] | None = None) -> dict:
        """The engine prompt for `messages`: text and token ids, tokenized once here."""
        text = self.render(messages, tools)
        return {"prompt": text, "prompt_token_ids": list(self._own().encode(text, add_special_tokens=False))}

    async def prompt_async(self, messages: Any, input_processor=None, tools: list[dict] | None = None) -> dict:
        """`prompt()` on this renderer's one thread (so its tokenizer copy is never shared): a long
        conversation does not stall the event loop's other streams while it renders and tokenizes.
        With the front's `input_processor`, a conversation whose text alone could not fit
        max_model_len is refused first (the completions' byte bound); at most MAX_QUEUED_RENDERS
        wait for the thread (QueueFullError past that)."""
        check_chat_size(messages, input_processor)
        if self._pool is None:
            self._pool = BoundedPool(1, MAX_QUEUED_RENDERS, "chat-template")
        return await self._pool.run(self.prompt, messages, tools)

    async def run(self, fn, *args) -> Any:
        """fn(tokenizer, *args) on this renderer's thread, with its own tokenizer copy."""
        if self._pool is None:
            self._pool = BoundedPool(1, MAX_QUEUED_RENDERS, "chat-template")
        return await self._pool.run(lambda: fn(self._own(), *args))

    def _own(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = copy.deepcopy(self._source)
        return self._tokenizer
