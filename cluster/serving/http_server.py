"""The OpenAI-compatible HTTP API on aiohttp: one more entry point of the serving frontend.

    GET /v1/models, POST /v1/completions, POST /v1/chat/completions, GET /health,
    POST /v1/load_lora_adapter, POST /v1/unload_lora_adapter (vLLM's; behind the token like the rest)
    GET /v1/models/{model}, POST /tokenize, POST /detokenize (vLLM's shapes)

Requests go through the same frontend as gRPC (one tokenizer, one detokenizer, one set of
metrics); this module only translates (see openai_protocol). Errors come back in OpenAI's JSON
shape, never as a traceback. A client that disconnects cancels its handler (aiohttp's
handler_cancellation), which closes the frontend's stream: the request is aborted and its KV
blocks freed. aiohttp was measured against FastAPI+uvicorn (benchmarks/http_vs_grpc.py).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from pathlib import Path
from typing import Any, AsyncIterator

import msgspec
from aiohttp import web

from pagedray.common.errors import EngineDeadError
from pagedray.cluster.serving.frontend import QueueFullError
from pagedray.cluster.serving.chat import ChatRenderer
from pagedray.cluster.serving.detokenizer import TokenTexts
from pagedray.cluster.serving.endpoint_auth import bearer_matches, checked_token
from pagedray.cluster.serving.http_guard import (BODY_TIMEOUT_S, HEADER_TIMEOUT_S, MAX_CONNECTIONS, BodyTimeout,
                                                 BoundedSite, guarded_runner, read_body)
from pagedray.cluster.serving.limits import check_seats, parse_json
from pagedray.cluster.serving.lora_registry import LoRARegistry
from pagedray.cluster.serving.openai_protocol import (OpenAIError, ParsedRequest, ResponseBuilder,
                                                      bad_request, check_model, parse_chat,
                                                      parse_completion, render_error)
from pagedray.cluster.serving.tool_calls import TOOL_CALL_PARSERS, parse_tools
from pagedray.cluster.serving import tokenize_routes

logger = logging.getLogger(__name__)
_encode = msgspec.json.Encoder().encode   # a few times faster than json.dumps, per stream chunk
_OPEN_PATHS = ("/health",)


def _error_response(error: OpenAIError) -> web.Response:
    return web.json_response(error.body(), status=error.status)


def _engine_error(exc: BaseException, body: dict, aliases: dict[str, str]) -> OpenAIError | None:
    """The frontend's errors as OpenAI errors (None: a bug, answered as a plain 500)."""
    if isinstance(exc, OpenAIError):
        return exc
    if isinstance(exc, ValueError):
        return bad_request(exc, body, aliases)
    if isinstance(exc, QueueFullError):
        return OpenAIError(429, str(exc), type="rate_limit_error", code="queue_full")
    if isinstance(exc, EngineDeadError):
        return OpenAIError(503, str(exc), type="service_unavailable", code="engine_unavailable")
    return None


async def merge(streams: list[AsyncIterator]) -> AsyncIterator[tuple[int, Any]]:
    """(index, item) from several async iterators as they come; closing this closes them all."""
    if len(streams) == 1:
        async with contextlib.aclosing(streams[0]) as stream:
            async for item in stream:
                yield 0, item
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator) -> None:
        try:
            async with contextlib.aclosing(stream) as s:
                async for item in s:
                    queue.put_nowait((i, item, None))
        except Exception as exc:  # noqa: BLE001 - handed to the reader, which raises it
            queue.put_nowait((i, None, exc))
            return
        queue.put_nowait((i, None, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item, exc = await queue.get()
            if exc is not None:
                raise exc
            if item is None:
                remaining -= 1
                continue
            yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class HttpServer:
    """`start()` binds (port 0 picks one: see `.port`); `stop()` closes. Pass the frontend that
    serves gRPC, so both share its engines, tokenizer and metrics."""

    def __init__(self, frontend: Any, model_name: str, *, host: str = "127.0.0.1", port: int = 8000,
                 auth_token: str | None = None, tls_cert: str | Path | None = None,
                 tls_key: str | Path | None = None, chat_template: str | None = None,
                 header_timeout: float = HEADER_TIMEOUT_S, body_timeout: float = BODY_TIMEOUT_S,
                 max_connections: int = MAX_CONNECTIONS, tool_call_parser: str | None = None) -> None:
        self._token = checked_token(auth_token, tls_cert, tls_key)
        if tool_call_parser is not None and tool_call_parser not in TOOL_CALL_PARSERS:
            raise ValueError(f"tool_call_parser must be one of {', '.join(TOOL_CALL_PARSERS)}, "
                             f"got {tool_call_parser!r}")
        self.tool_call_parser = tool_call_parser
        self.frontend, self.model_name = frontend, model_name
        self.loras = getattr(frontend, "loras", None)
        if self.loras is None:   # (test fakes have none)
            self.loras = LoRARegistry()
        self.loras.base_model_name = model_name
        self.host, self.requested_port = host, port
        self._ssl = None
        if tls_cert is not None:
            self._ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self._ssl.load_cert_chain(str(tls_cert), str(tls_key))
        self.chat = ChatRenderer(frontend.tokenizer, chat_template)
        self.strings = TokenTexts(frontend.tokenizer)
        self.draining = False
        self.port: int | None = None
        self._runner: web.AppRunner | None = None
        self._site: BoundedSite | None = None
        self.header_timeout, self.body_timeout, self.max_connections = header_timeout, body_timeout, max_connections

    def build_app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors, self._auth], client_max_size=64 << 20)
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/models/{model}", self.model)
        app.router.add_post("/tokenize", self.tokenize)
        app.router.add_post("/detokenize", self.detokenize)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_post("/v1/load_lora_adapter", self.load_lora_adapter)
        app.router.add_post("/v1/unload_lora_adapter", self.unload_lora_adapter)
        return app

    async def start(self) -> None:
        # Slow senders are cut off (header and body timeouts) and connections bounded: see http_guard.
        self._runner = guarded_runner(self.build_app(), self.header_timeout, handler_cancellation=True,
                                      access_log=None)
        await self._runner.setup()
        self._site = BoundedSite(self._runner, self.host, self.requested_port, ssl_context=self._ssl,
                                 max_connections=self.max_connections)
        await self._site.start()
        self.port = self._site.port

    @property
    def num_connections(self) -> int:
        return self._site.num_connections if self._site is not None else 0

    @property
    def url(self) -> str:
        return f"{'https' if self._ssl else 'http'}://{self.host}:{self.port}"

    async def stop(self) -> None:
        self.draining = True
        if self._runner is not None:
            await self._runner.cleanup()

    # -- middlewares ------------------------------------------------------------------------
    @web.middleware
    async def _errors(self, request: web.Request, handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except OpenAIError as exc:
            return _error_response(exc)
        except web.HTTPException as exc:   # unknown route, wrong method: still OpenAI's shape
            return _error_response(OpenAIError(exc.status, exc.reason, code=str(exc.status)))
        except Exception:  # noqa: BLE001 - a bug: log it, never send the traceback
            logger.exception("unhandled error in %s %s", request.method, request.path)
            return _error_response(OpenAIError(500, "internal server error", type="internal_error"))

    @web.middleware
    async def _auth(self, request: web.Request, handler) -> web.StreamResponse:
        if self._token is not None and request.path not in _OPEN_PATHS:
            if not bearer_matches(request.headers.get("Authorization", ""), self._token):
                raise OpenAIError(401, "missing or wrong bearer token (Authorization: Bearer ...)",
                                  type="authentication_error", code="invalid_api_key")
        return await handler(request)

    # -- routes -------------------------------------------------------------------------------
    async def health(self, request: web.Request) -> web.Response:
        ok = self.frontend.is_healthy and not self.draining
        return web.json_response({"status": "ok" if ok else "unavailable"}, status=200 if ok else 503)

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": self._model_cards()})

    def _model_cards(self) -> list[dict]:
        info = self.frontend.info
        model = {"id": self.model_name, "object": "model", "created": 0, "owned_by": "pagedray",
                 "root": info.model, "parent": None, "max_model_len": info.max_model_len}
        adapters = [{"id": lora.lora_name, "object": "model", "created": 0, "owned_by": "pagedray",
                     "root": lora.lora_path, "parent": self.model_name, "max_model_len": info.max_model_len}
                    for lora in self.loras]
        return [model, *adapters]

    async def model(self, request: web.Request) -> web.Response:
        """GET /v1/models/{model} (`client.models.retrieve`): its card, or 404 naming it."""
        name, _ = self._model({"model": request.match_info["model"]})
        return web.json_response(next(card for card in self._model_cards() if card["id"] == name))

    def _model(self, body: dict):
        """(the name `model` asked for, its LoRARequest or None for the base model); 404 if unknown."""
        name = body.get("model")
        lora = self.loras.get(name) if isinstance(name, str) and name != self.model_name else None
        if lora is not None:
            return name, lora
        check_model(body, self.model_name)
        return self.model_name, None

    async def tokenize(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        self._model(body)
        return web.json_response(await tokenize_routes.tokenize(body, self.frontend, self.chat))

    async def detokenize(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        self._model(body)
        return web.json_response(tokenize_routes.detokenize(body, self.frontend, self.strings))

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        name, lora = self._model(body)
        return await self._serve(request, body, parse_completion(body, name), chat=False, model=name, lora=lora)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        name, lora = self._model(body)
        try:
            tools = parse_tools(body, self.tool_call_parser)
        except ValueError as exc:
            raise bad_request(exc, body, {"tool": "tools"}) from exc
        try:
            inputs = getattr(self.frontend, "input_processor", None)   # the byte bound, before rendering
            prompt = await self.chat.prompt_async(body.get("messages"), inputs, tools.tools if tools else None)
        except ValueError as exc:
            raise render_error(exc) from exc
        except QueueFullError as exc:
            raise _engine_error(exc, body, {}) from exc
        parsed = parse_chat(body, name, prompt, tools, self.tool_call_parser)
        return await self._serve(request, body, parsed, chat=True, model=name, lora=lora)

    async def load_lora_adapter(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        name = body.get("lora_name")
        try:
            self.loras.load(name, body.get("lora_path"))
        except ValueError as exc:
            param = "lora_path" if str(exc).startswith(("LoRA adapter", "lora_path")) else "lora_name"
            raise OpenAIError(400, str(exc), param=param) from exc
        return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")

    async def unload_lora_adapter(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        name = body.get("lora_name")
        try:
            self.loras.unload(name)
        except KeyError as exc:
            raise OpenAIError(404, exc.args[0], param="lora_name", code="lora_not_found") from exc
        return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")

    async def _body(self, request: web.Request) -> dict:
        if self.draining:
            raise OpenAIError(503, "the server is draining", type="service_unavailable")
        try:
            body = parse_json(await read_body(request, self.body_timeout))
        except BodyTimeout as exc:
            raise OpenAIError(408, str(exc), code="request_timeout") from exc
        except ValueError as exc:   # bad JSON, too deep, a lone surrogate (named by its path)
            field = str(exc).split(" ", 1)[0].split(".")[0].split("[")[0]
            raise OpenAIError(400, str(exc), param=None if field in ("the", "a") else field) from exc
        if not isinstance(body, dict):
            raise OpenAIError(400, "the request body must be a JSON object")
        return body

    # -- generation -----------------------------------------------------------------------------
    async def _serve(self, request: web.Request, body: dict, parsed: ParsedRequest, chat: bool,
                     model: str, lora=None) -> web.StreamResponse:
        try:
            check_seats(parsed.params.n, len(parsed.prompts), self.frontend.info)
        except ValueError as exc:
            raise _engine_error(exc, body, parsed.aliases) from exc
        builder = ResponseBuilder(parsed, model, self.strings, chat)
        extra = {"lora_request": lora} if lora is not None else {}
        streams = [self.frontend.generate(prompt, parsed.params, request_id, **extra)
                   for prompt, request_id in zip(parsed.prompts, builder.request_ids())]
        async with contextlib.aclosing(merge(streams)) as outputs:
            try:
                first = await anext(outputs)   # bad input, a full queue, no engine: a status, not a stream
            except Exception as exc:
                raise _engine_error(exc, body, builder.parsed.aliases) or exc
            if parsed.stream:
                return await self._stream(request, body, builder, first, outputs)
            builder.add(*first)
            try:
                async for p, out in outputs:
                    builder.add(p, out)
            except Exception as exc:
                raise _engine_error(exc, body, builder.parsed.aliases) or exc
        return web.Response(body=_encode(builder.response()), content_type="application/json")

    async def _stream(self, request: web.Request, body: dict, builder: ResponseBuilder, first,
                      outputs: AsyncIterator) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)

        async def send(chunk: dict) -> None:
            await response.write(b"data: " + _encode(chunk) + b"\n\n")

        for chunk in builder.first_chunks():
            await send(chunk)
        try:
            for chunk in builder.chunks(*first):
                await send(chunk)
            async for p, out in outputs:
                for chunk in builder.chunks(p, out):
                    await send(chunk)
            if (usage := builder.usage_chunk()) is not None:
                await send(usage)
        except (ValueError, QueueFullError, EngineDeadError) as exc:   # mid-stream: the status is sent
            await send(_engine_error(exc, body, builder.parsed.aliases).body())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

