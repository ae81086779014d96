"""vLLM's `/tokenize` and `/detokenize` bodies, answered with the served model's tokenizer.

    POST /tokenize    {"prompt": str, "add_special_tokens": true, "return_token_strs": false}
                   or {"messages": [...], "add_generation_prompt": true, "tools": [...]}
                   -> {"count", "max_model_len", "tokens", "token_strs"}
    POST /detokenize  {"tokens": [int, ...]} -> {"prompt": str}
"""
from __future__ import annotations

from typing import Any

from pagedray.cluster.serving.openai_protocol import OpenAIError

_TOKENIZE_FIELDS = {"model", "prompt", "messages", "add_special_tokens", "add_generation_prompt",
                    "return_token_strs", "tools"}


def _flag(body: dict, name: str, default: bool) -> bool:
    value = body.get(name, default)
    if not isinstance(value, bool):
        raise OpenAIError(400, f"{name} must be a boolean, got {value!r}", param=name)
    return value


async def tokenize(body: dict, frontend: Any, chat: Any) -> dict:
    unknown = sorted(set(body) - _TOKENIZE_FIELDS)
    if unknown:
        raise OpenAIError(400, f"unknown field(s): {', '.join(unknown)}", param=unknown[0])
    if frontend.tokenizer is None:
        raise OpenAIError(400, "this model has no tokenizer", param="prompt")
    strs = _flag(body, "return_token_strs", False)
    if ("prompt" in body) == ("messages" in body):
        raise OpenAIError(400, "set one of prompt or messages", param="prompt")
    if "messages" in body:
        if not _flag(body, "add_generation_prompt", True):
            raise OpenAIError(400, "add_generation_prompt: only true is supported", param="add_generation_prompt")
        try:
            ids = (await chat.prompt_async(body["messages"], getattr(frontend, "input_processor", None),
                                           tools=body.get("tools")))["prompt_token_ids"]
        except ValueError as exc:
            raise OpenAIError(400, str(exc), param="messages") from exc
    else:
        prompt = body["prompt"]
        if not isinstance(prompt, str):
            raise OpenAIError(400, "prompt must be a string", param="prompt")
        special = _flag(body, "add_special_tokens", True)
        ids = await chat.run(lambda tok, text: list(tok.encode(text, add_special_tokens=special)), prompt)
    result = {"count": len(ids), "max_model_len": frontend.info.max_model_len, "tokens": ids, "token_strs": None}
    if strs:
        result["token_strs"] = await chat.run(lambda tok, t: tok.convert_ids_to_tokens(t), ids)
    return result


def detokenize(body: dict, frontend: Any, strings: Any) -> dict:
    unknown = sorted(set(body) - {"model", "tokens"})
    if unknown:
        raise OpenAIError(400, f"unknown field(s): {', '.join(unknown)}", param=unknown[0])
    tokens, vocab = body.get("tokens"), frontend.info.vocab_size
    if not isinstance(tokens, list) or any(type(t) is not int or not 0 <= t < vocab for t in tokens):
        raise OpenAIError(400, f"tokens must be a list of token ids in [0, {vocab})", param="tokens")
    if frontend.tokenizer is None:
        raise OpenAIError(400, "this model has no tokenizer", param="tokens")
    return {"prompt": strings.decode(tokens)}
