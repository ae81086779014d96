"""The gRPC generate endpoint (`pagedray.v1.Generation`) on grpc.aio, in front of the Frontend
(which owns tokenization, detokenization, streams and migration over one or more engine clients).

Also serves grpc.health.v1.Health (SERVING while at least one replica is ready and the
server is not draining) and server reflection; optional TLS and bearer-token auth;
Prometheus metrics on a separate HTTP port.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from pagedray.cluster.outputs import RequestOutput
from pagedray.cluster.serving.chat import ChatRenderer
from pagedray.cluster.serving.detokenizer import TokenTexts
from pagedray.cluster.serving.endpoint_auth import bearer_matches, checked_token
from pagedray.common.errors import EngineDeadError
from pagedray.cluster.serving.frontend import Frontend, QueueFullError
from pagedray.cluster.serving.http_guard import MetricsServer
from pagedray.cluster.serving.limits import MAX_N, check_seats
from pagedray.protos import generate_pb2 as pb
from pagedray.protos import generate_pb2_grpc as pb_grpc
from pagedray.common.quoting import clip, quote
from pagedray.common.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Generation"].full_name
MAX_LOGPROBS = 20           # vLLM's default max_logprobs
MAX_REQUEST_ID_CHARS = 256
# A unary reply must fit a client's default gRPC receive limit (4 MiB); larger ones need the stream.
MAX_UNARY_REPLY_BYTES = 4 * 1024 * 1024

_FINISH = {None: pb.FINISH_REASON_UNSPECIFIED, "stop": pb.FINISH_REASON_STOP,
           "length": pb.FINISH_REASON_LENGTH, "abort": pb.FINISH_REASON_ABORT}
_OPTIONAL = ("temperature", "top_p", "top_k", "min_p", "max_tokens", "n", "logprobs",
             "repetition_penalty", "seed")
_FLOATS = {"temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"}


class UnknownModelError(LookupError):
    pass


class ChatInput(list):
    """A call's chat messages, rendered later off the event loop (`ChatRenderer.prompt_async`)."""


# -- proto <-> engine ----------------------------------------------------------------
def _f32(value: float) -> float:
    """Proto floats are float32: 0.7 arrives as 0.699999988. Take the shortest decimal
    that rounds to the same float32, so the server samples exactly what the client asked."""
    return float(str(np.float32(value)))


def sampling_from_proto(s: pb.SamplingParams) -> SamplingParams:
    """Unset optional fields keep SamplingParams' (vLLM's) defaults; bad values raise ValueError."""
    kwargs = {name: getattr(s, name) for name in _OPTIONAL if s.HasField(name)}
    kwargs.update(min_tokens=s.min_tokens, stop=list(s.stop), stop_token_ids=list(s.stop_token_ids),
                  ignore_eos=s.ignore_eos, presence_penalty=s.presence_penalty,
                  frequency_penalty=s.frequency_penalty)
    kwargs = {k: _f32(v) if k in _FLOATS else v for k, v in kwargs.items()}
    if kwargs.get("n", 1) > MAX_N:
        raise ValueError(f"n must be <= {MAX_N}, got {kwargs['n']}")
    if kwargs.get("logprobs") is not None and kwargs["logprobs"] > MAX_LOGPROBS:
        raise ValueError(f"logprobs must be <= {MAX_LOGPROBS}, got {kwargs['logprobs']}")
    if s.HasField("structured_outputs"):
        kwargs["structured_outputs"] = structured_from_proto(s.structured_outputs)
    if s.logit_bias:
        kwargs["logit_bias"] = {token: _f32(bias) for token, bias in s.logit_bias.items()}
    return SamplingParams(**kwargs)


def structured_from_proto(so: pb.StructuredOutputs) -> dict:
    """The proto's oneof as StructuredOutputsParams' fields (SamplingParams checks them)."""
    kind = so.WhichOneof("kind")
    if kind is None:
        raise ValueError("structured_outputs must set one of json, regex, choice, grammar, json_object")
    if kind == "choice":
        return {"choice": list(so.choice.values)}
    return {kind: getattr(so, kind)}


def parse_request(request: pb.GenerateRequest, served_model: str,
                  chat: ChatRenderer | None = None) -> tuple[str | dict, SamplingParams, str]:
    if request.model and request.model != served_model:
        raise UnknownModelError(f"model {quote(request.model)} is not served here (serving {served_model!r})")
    which = request.WhichOneof("input")
    if which is None:
        raise ValueError("prompt: set one of prompt, prompt_token_ids or chat")
    if which == "chat":
        if chat is None:
            raise ValueError("chat: this server does not render chat messages")
        prompt = ChatInput({"role": m.role, "content": m.content} for m in request.chat.messages)
    else:
        prompt = request.prompt if which == "prompt" else {"prompt_token_ids": list(request.prompt_token_ids.ids)}
    if len(request.request_id) > MAX_REQUEST_ID_CHARS:
        raise ValueError(f"request_id must be at most {MAX_REQUEST_ID_CHARS} characters, "
                         f"got {len(request.request_id)}")
    request_id = request.request_id or f"grpc-{uuid.uuid4().hex}"
    return prompt, sampling_from_proto(request.sampling), request_id


def to_response(out: RequestOutput, num_logprobs: int | None, texts: TokenTexts,
                usage: pb.Usage | None = None) -> pb.GenerateResponse:
    response = pb.GenerateResponse(request_id=out.request_id)
    for c in out.outputs:
        completion = response.completions.add(index=c.index, text=c.text, token_ids=c.token_ids,
                                              finish_reason=_FINISH[c.finish_reason])
        for token_id, entry in zip(c.token_ids, c.logprobs or []):
            item = completion.logprobs.add(token_id=token_id, logprob=entry.get(token_id, float("nan")))
            top = sorted(entry.items(), key=lambda kv: -kv[1])[:num_logprobs or 0]
            for tid, lp in top:
                item.top.add(token_id=tid, logprob=lp, text=texts.token(tid))
    if usage is not None:
        response.usage.CopyFrom(usage)
    return response


class _Usage:
    """Token counts of one call, added up from its delta outputs."""

    def __init__(self) -> None:
        self.completion_tokens = 0

    def add(self, delta: RequestOutput) -> None:
        self.completion_tokens += sum(len(c.token_ids) for c in delta.outputs)

    def proto(self, out: RequestOutput) -> pb.Usage:
        return pb.Usage(prompt_tokens=len(out.prompt_token_ids), completion_tokens=self.completion_tokens,
                        cached_prompt_tokens=out.num_cached_tokens)


def unary_reply_bytes(params: SamplingParams, max_model_len: int) -> int:
    """What a unary reply of `params` encodes to, about: per token its id and text (~8 bytes) and,
    with logprobs, an entry (~12) plus ~14 per top alternative (measured: 290 bytes a token at 20)."""
    per_token = 8 + (12 + 14 * params.logprobs if params.logprobs is not None else 0)
    return params.n * _max_tokens(params, max_model_len) * per_token


def _max_tokens(params: SamplingParams, max_model_len: int) -> int:
    return min(params.max_tokens or max_model_len, max_model_len)


def check_unary_reply(params: SamplingParams, max_model_len: int) -> None:
    """Refuse, before any work, a unary call whose reply would not fit the message limit."""
    size = unary_reply_bytes(params, max_model_len)
    if size > MAX_UNARY_REPLY_BYTES:
        raise ValueError(
            f"the reply of n={params.n} x max_tokens={_max_tokens(params, max_model_len)} tokens with "
            f"logprobs={params.logprobs} would be about {size / 2**20:.1f} MiB, over the "
            f"{MAX_UNARY_REPLY_BYTES // 2**20} MiB limit of a unary reply: use GenerateStream "
            f"(or lower n, max_tokens or logprobs)")


def _status_of(exc: BaseException) -> grpc.StatusCode | None:
    if isinstance(exc, UnknownModelError):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(exc, ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(exc, QueueFullError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(exc, EngineDeadError):
        return grpc.StatusCode.UNAVAILABLE
    return None


# -- the service -------------------------------------------------------------------------
class GenerationService(pb_grpc.GenerationServicer):
    def __init__(self, frontend: Frontend, model_name: str, chat_template: str | None = None) -> None:
        self.frontend = frontend
        self.model_name = model_name
        self.draining = False
        self.texts = TokenTexts(frontend.tokenizer)
        self.chat = ChatRenderer(frontend.tokenizer, chat_template)

    async def Generate(self, request, context):
        async with self._outputs(request, context, unary=True) as (outputs, params):
            async for whole in outputs:   # final_only: one cumulative output, when it finishes
                pass
        usage = _Usage()
        usage.add(whole)
        return to_response(whole, params.logprobs, self.texts, usage.proto(whole))

    async def GenerateStream(self, request, context):
        async with self._outputs(request, context) as (outputs, params):
            usage = _Usage()
            async for delta in outputs:   # the frontend sends at most one per engine step
                usage.add(delta)
                yield to_response(delta, params.logprobs, self.texts, usage.proto(delta) if delta.finished else None)

    async def ListModels(self, request, context):
        info = self.frontend.info
        model = pb.ModelInfo(name=self.model_name, architecture=info.architecture, max_model_len=info.max_model_len,
                             tensor_parallel_size=info.tensor_parallel_size,
                             replicas=self.frontend.num_ready_replicas,
                             replicas_total=self.frontend.router.num_wanted, root=info.model)
        adapters = [pb.ModelInfo(name=lora.lora_name, architecture=info.architecture,
                                 max_model_len=info.max_model_len, tensor_parallel_size=info.tensor_parallel_size,
                                 replicas=self.frontend.num_ready_replicas,
                                 replicas_total=self.frontend.router.num_wanted, parent=self.model_name,
                                 root=lora.lora_path)
                    for lora in getattr(self.frontend, "loras", ())]
        return pb.ListModelsResponse(models=[model, *adapters])

    def _lora(self, request):
        """The adapter `lora_name` (or `model`) names; None for the base model."""
        name = request.lora_name or (request.model if request.model != self.model_name else "")
        loras = getattr(self.frontend, "loras", None)
        lora = loras.get(name) if name and loras is not None else None
        if lora is None and request.lora_name:
            raise UnknownModelError(f"lora_name {quote(request.lora_name)} is not a LoRA adapter served here")
        return lora

    @contextlib.asynccontextmanager
    async def _outputs(self, request, context, unary: bool = False):
        """The frontend's delta stream for one call; errors become gRPC statuses.

        `aclosing` makes a cancelled call (client gone, deadline passed) close the
        generator at once, which aborts the request and frees its KV blocks.
        """
        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is draining")
        try:
            lora = self._lora(request)
            served = request.model if lora is not None and request.model == lora.lora_name else self.model_name
            prompt, params, request_id = parse_request(request, served, self.chat)
            check_seats(params.n, 1, self.frontend.info)
            if isinstance(prompt, ChatInput):   # rendered and tokenized on the chat thread, bounded
                prompt = await self.chat.prompt_async(prompt, self.frontend.input_processor)
            if unary:
                check_unary_reply(params, self.frontend.info.max_model_len)
            extra = {"lora_request": lora} if lora is not None else {}
            async with contextlib.aclosing(self.frontend.generate(prompt, params, request_id,
                                                                  final_only=unary, **extra)) as outputs:
                yield outputs, params
        except Exception as exc:
            code = _status_of(exc)
            if code is None:
                raise
            await context.abort(code, clip(str(exc)))


class _Malformed:
    """What the request deserializer returns for a body that does not parse."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


class _SafeBodies(grpc.aio.ServerInterceptor):
    """A body that is not a valid message (truncated, invalid UTF-8 in a string) is INVALID_ARGUMENT
    and one log line, not UNKNOWN and a traceback: the handler's deserializer never raises.
    Wraps this service's methods (unary requests; async-generator streams) only."""

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or not details.method.startswith(f"/{SERVICE_NAME}/"):
            return handler
        parse, method = handler.request_deserializer, details.method

        def deserialize(body: bytes):
            try:
                return parse(body)
            except Exception as exc:   # protobuf's DecodeError, or any parse failure
                return _Malformed(f"{type(exc).__name__}: {clip(str(exc), 200)}")

        async def refuse(request: _Malformed, context) -> None:
            logger.warning("%s: malformed request body (%s)", method, request.reason)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request body ({request.reason})")

        async def unary(request, context):
            if isinstance(request, _Malformed):
                await refuse(request, context)
            return await handler.unary_unary(request, context)

        async def stream(request, context):
            if isinstance(request, _Malformed):
                await refuse(request, context)
            async for reply in handler.unary_stream(request, context):
                yield reply

        make, behavior = (grpc.unary_stream_rpc_method_handler, stream) if handler.response_streaming else \
            (grpc.unary_unary_rpc_method_handler, unary)
        return make(behavior, request_deserializer=deserialize, response_serializer=handler.response_serializer)


class _BearerAuth(grpc.aio.ServerInterceptor):
    """Every method but health checks needs `authorization: Bearer <token>`."""

    def __init__(self, token: bytes) -> None:
        self._token = token

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(f"/{health.SERVICE_NAME}/"):
            return handler
        if bearer_matches(dict(details.invocation_metadata or ()).get("authorization", ""), self._token):
            return handler
        return _deny(handler)


def _deny(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """Refuses the call; no request deserializer, so an unauthenticated body is never parsed."""
    async def abort(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

    kinds = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
             (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}
    return kinds[handler.request_streaming, handler.response_streaming](
        abort, response_serializer=handler.response_serializer)


class GenerateServer:
    """The Frontend behind a grpc.aio server. `start()`, then `stop()` drains and shuts every
    replica down (stop an Autoscaler feeding the frontend's router first, or it keeps adding)."""

    def __init__(self, frontend: Frontend, model_name: str, *, host: str = "127.0.0.1", port: int = 50051,
                 auth_token: str | None = None, tls_cert: bytes | None = None, tls_key: bytes | None = None,
                 metrics_port: int | None = None, chat_template: str | None = None,
                 metrics_header_timeout: float = 10.0) -> None:
        token = checked_token(auth_token, tls_cert, tls_key)
        self.frontend = frontend
        self.host, self.requested_port = host, port
        self.service = GenerationService(frontend, model_name, chat_template)
        self.health = health.aio.HealthServicer()
        # Auth first: it wraps what _SafeBodies returns, so a refused call's body is never parsed.
        interceptors = ([_BearerAuth(token)] if token else []) + [_SafeBodies()]
        # SO_REUSEPORT off: a second server on a port in use must fail, not share its traffic.
        self.server = grpc.aio.server(interceptors=interceptors, options=[("grpc.so_reuseport", 0)])
        self._credentials = grpc.ssl_server_credentials([(tls_key, tls_cert)]) if tls_cert else None
        self.requested_metrics_port = metrics_port
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._metrics_http: MetricsServer | None = None
        self.metrics_header_timeout = metrics_header_timeout   # a scrape must send its request head within it

    async def start(self) -> None:
        pb_grpc.add_GenerationServicer_to_server(self.service, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME),
                                            self.server)
        self.port = self._bind(f"{self.host}:{self.requested_port}")
        if self.requested_metrics_port is not None:
            self._metrics_http = MetricsServer(self.frontend.metrics.registry, self.host, self.requested_metrics_port,
                                               header_timeout=self.metrics_header_timeout)
            self.metrics_port = await self._metrics_http.start()
        self.frontend.router.on_change(self._on_replicas_changed)
        await self.server.start()
        await self._set_health(self.frontend.is_healthy)

    def _bind(self, address: str) -> int:
        try:
            port = (self.server.add_secure_port(address, self._credentials) if self._credentials
                    else self.server.add_insecure_port(address))
        except RuntimeError:   # grpc's "Failed to bind to address ..."
            port = 0
        if not port:
            raise OSError(f"cannot listen on {address}: the port is in use "
                          f"(or the host is not an address of this machine)")
        return port

    async def _set_health(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    def _on_replicas_changed(self) -> None:
        if self.service.draining:
            return
        serving = self.frontend.is_healthy
        if not serving:
            logger.error("no healthy replica left: health is NOT_SERVING")
        # Called on the event loop from a plain callback: schedule the async update.
        asyncio.get_running_loop().create_task(self._set_health(serving))

    async def stop(self, grace: float = 30.0) -> None:
        """Drain, then shut down. While draining the port stays open: health says NOT_SERVING
        and new calls get UNAVAILABLE, so probes and clients see why; in-flight requests get
        up to `grace` seconds to finish, then the rest are cancelled (which aborts them)."""
        self.service.draining = True
        await self._set_health(False)
        deadline = time.monotonic() + grace
        while self.frontend.num_pending and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        # Lets responses already produced reach their clients; cancels what is left.
        await self.server.stop(max(0.5, deadline - time.monotonic()) if self.frontend.num_pending == 0 else 0)
        await self.frontend.shutdown()
        self.frontend.metrics.close()
        if self._metrics_http is not None:
            await self._metrics_http.stop()

    async def wait_for_termination(self) -> None:
        await self.server.wait_for_termination()
