"""`pagedray` command line: one argparse subparser per subcommand.

Add a subcommand by writing `add_<name>_parser(subparsers)` that sets `func` and
listing it in `_SUBCOMMANDS`.
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import os
import signal
import sys
from pathlib import Path

from pagedray.cluster.cli_chat import add_chat_parser
from pagedray.cluster.cli_common import DefaultsHelpFormatter, read_flag_file, resolve_model
from pagedray.cluster.cli_generate import add_generate_parser
from pagedray.cluster.cli_info import add_info_parser
from pagedray.cluster.serve_preflight import check_serve_args, flag_names
from pagedray.cluster.cli_lora import add_lora_args, lora_engine_kwargs, register_lora_modules
from pagedray.cluster.serving.chat import load_chat_template
from pagedray.common import envs

logger = logging.getLogger("pagedray.serve")


# -- serve ---------------------------------------------------------------------------------
def add_serve_parser(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve a model over gRPC (and the OpenAI HTTP API: --http-port)")
    p.add_argument("--model", help="HF checkpoint folder (default: $PAGEDRAY_MODEL, else the default model, "
                                    "whose folder `pagedray info` prints)")
    p.add_argument("--served-model-name", help="name clients pass as `model` (default: the folder name)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=50051, help="0 picks a free port (logged when ready)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs per replica (needs --executor ray)")
    p.add_argument("--pipeline-parallel-size", type=int, default=1,
                   help="pipeline stages per replica, each of --tensor-parallel-size GPUs (needs --executor ray)")
    p.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="local: this process; ray: one Ray actor per tensor-parallel rank")
    p.add_argument("--dtype", default="auto", help="auto: the checkpoint's on GPU, float32 on CPU")
    p.add_argument("--load-format", default="auto", choices=("auto", "safetensors", "dummy"))
    p.add_argument("--quantization", choices=("fp8",), default=None,
                   help="fp8: quantize a 16/32-bit checkpoint's linear layers at load (FP8 checkpoints are "
                        "recognised from their config without it)")
    p.add_argument("--kv-cache-dtype", choices=("auto", "fp8", "fp8_e4m3"), default="auto",
                   help="fp8: an e4m3 KV cache, twice the tokens per block (on CUDA: float16/bfloat16 models)")
    p.add_argument("--max-model-len", type=int, help="cap the context length (default: the model's)")
    p.add_argument("--max-num-seqs", type=int, default=256, help="sequences in one batch at most")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block (8, 16 or 32 on CUDA)")
    p.add_argument("--num-kv-blocks", type=int, help="KV-cache blocks (default: sized from the free memory)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--max-num-batched-tokens", type=int,
                   help="tokens in one step at most (default: max(2048, --max-num-seqs) with chunked prefill)")
    p.add_argument("--tpot-target-ratio", type=float, default=None,
                   help="prefill pacing: size the prefill next to running decodes from measured step times so "
                        "their mean step time stays near this multiple of a decode-only step (e.g. 1.25; "
                        "default: off)")
    p.add_argument("--max-prefill-delay-ms", type=float, default=250.0,
                   help="prefill pacing never holds a prompt back longer than this after its arrival")
    p.add_argument("--min-prefill-chunk-tokens", type=int, default=64,
                   help="prefill pacing gives a step no prefill rather than a smaller chunk")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--speculative-config", type=_json_object, metavar="JSON",
                   help='speculative decoding, vLLM\'s dict as JSON, e.g. \'{"method": "ngram", '
                        '"num_speculative_tokens": 4, "prompt_lookup_max": 4}\'')
    p.add_argument("--max-pending-requests", type=int, default=1024,
                   help="requests admitted at once; beyond it calls get RESOURCE_EXHAUSTED")
    p.add_argument("--auth-token-file", type=Path,
                   help="file holding the bearer token clients must send (default: $PAGEDRAY_AUTH_TOKEN)")
    p.add_argument("--insecure", action="store_true",
                   help="allow a --host beyond loopback without a bearer token (anyone who reaches the port)")
    p.add_argument("--tls-cert", type=Path)
    p.add_argument("--tls-key", type=Path)
    p.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this port")
    p.add_argument("--http-port", type=int,
                   help="also serve the OpenAI-compatible HTTP API on this port (0 picks one, logged when ready)")
    p.add_argument("--tool-call-parser", choices=("hermes", "llama3_json"), default=None,
                   help="how /v1/chat/completions finds tool calls in the model's text for tool_choice "
                        "auto: hermes (<tool_call> JSON: Qwen 2.5/3, Hermes) or llama3_json (Llama 3.1/3.2)")
    p.add_argument("--chat-template", type=Path,
                   help="Jinja chat template file, for models whose tokenizer has none (or to replace it)")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds in-flight requests get to finish on SIGTERM/SIGINT")
    add_lora_args(p)
    r = p.add_argument_group("replicas", "several engines behind one endpoint (needs --replica-backend ray)")
    r.add_argument("--replica-backend", choices=("local", "ray", "inproc"), default="local",
                   help="local: the engine in a subprocess of this one (restarted if it dies); ray: each "
                        "replica's engine in a Ray actor; inproc: the engine on a thread of this process")
    r.add_argument("--max-migrations", type=int, default=2,
                   help="times a request may move to another replica when its replica fails; "
                        "past it the call fails with UNAVAILABLE")
    r.add_argument("--replicas", type=int, help="replicas to start with (default: --min-replicas, else 1)")
    r.add_argument("--min-replicas", type=int, help="autoscaling floor (default: --replicas)")
    r.add_argument("--max-replicas", type=int, help="autoscaling ceiling (default: --replicas)")
    r.add_argument("--target-ongoing-requests", type=float, default=16.0,
                   help="in-flight requests per replica the autoscaler aims for")
    r.add_argument("--upscale-delay", type=float, default=30.0, help="seconds more replicas must be wanted first")
    r.add_argument("--downscale-delay", type=float, default=300.0, help="seconds fewer must be wanted first")
    p.set_defaults(func=_serve)


_SCALING_FLAGS = {"min_replicas": "--min-replicas", "max_replicas": "--max-replicas", "replicas": "--replicas",
                  "target_ongoing_requests": "--target-ongoing-requests", "upscale_delay_s": "--upscale-delay",
                  "downscale_delay_s": "--downscale-delay"}


def _scaling_config(args: argparse.Namespace):
    """--replicas/--min-replicas/--max-replicas as an AutoscalingConfig (fixed when min == max)."""
    from pagedray.cluster.serving.autoscaler import AutoscalingConfig
    initial = args.replicas if args.replicas is not None else \
        args.min_replicas if args.min_replicas is not None else 1
    low = args.min_replicas if args.min_replicas is not None else initial
    high = args.max_replicas if args.max_replicas is not None else max(initial, low)
    try:
        config = AutoscalingConfig(min_replicas=low, max_replicas=high, initial_replicas=initial,
                                   target_ongoing_requests=args.target_ongoing_requests,
                                   upscale_delay_s=args.upscale_delay, downscale_delay_s=args.downscale_delay)
    except ValueError as exc:   # named by its fields: say the flags, as typed
        raise ValueError(flag_names(str(exc), _SCALING_FLAGS)) from None
    if args.replica_backend != "ray" and config.max_replicas > 1:
        raise ValueError("more than one replica (--replicas/--max-replicas) needs --replica-backend ray")
    return config


def _json_object(text: str) -> dict:
    import json
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {text!r}")
    return value


def _serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ValueError("--tls-cert and --tls-key go together")
    # Unreadable or bad files, taken ports: fail now, before a model loads.
    args.auth_token = read_flag_file(args.auth_token_file, "--auth-token-file") \
        if args.auth_token_file else envs.auth_token()
    args.tls_cert_pem = read_flag_file(args.tls_cert, "--tls-cert", binary=True)
    args.tls_key_pem = read_flag_file(args.tls_key, "--tls-key", binary=True)
    args.chat_template_text = load_chat_template(args.chat_template) if args.chat_template else None
    check_serve_args(args)
    scaling = _scaling_config(args)
    model = resolve_model(args.model)
    kwargs = dict(device=args.device, tensor_parallel_size=args.tensor_parallel_size, executor=args.executor,
                  pipeline_parallel_size=args.pipeline_parallel_size,
                  dtype=args.dtype, load_format=args.load_format, max_model_len=args.max_model_len,
                  max_num_seqs=args.max_num_seqs, block_size=args.block_size, num_kv_blocks=args.num_kv_blocks,
                  gpu_memory_utilization=args.gpu_memory_utilization,
                  max_num_batched_tokens=args.max_num_batched_tokens,
                  tpot_target_ratio=args.tpot_target_ratio, max_prefill_delay_ms=args.max_prefill_delay_ms,
                  min_prefill_chunk_tokens=args.min_prefill_chunk_tokens,
                  enable_prefix_caching=args.enable_prefix_caching,
                  enable_chunked_prefill=args.enable_chunked_prefill, seed=args.seed,
                  quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype,
                  **lora_engine_kwargs(args))
    if args.speculative_config is not None:
        kwargs["speculative_config"] = args.speculative_config
    name = args.served_model_name or Path(model).name
    return asyncio.run(_run(model, kwargs, name, args, scaling))


def _make_client(model: str, kwargs: dict, backend: str, name: str, placer=None):
    """One engine client of `backend` (not started); Ray replicas share the driver's `placer`."""
    if backend == "ray":
        from pagedray.cluster.serving.ray_client import RayClient
        return RayClient(model, kwargs, name=name, placer=placer)
    if backend == "local":
        from pagedray.cluster.serving.process_client import ProcessClient
        return ProcessClient(model, kwargs, name=name)
    from pagedray.cluster.serving.inproc_client import InprocClient
    return InprocClient.for_model(model, name=name, **kwargs)


def _ray_autoscaler(frontend, model: str, kwargs: dict, scaling):
    """Replicas in Ray actors, kept between --min-replicas and --max-replicas (and replaced when they
    die) by the autoscaler, which also asks the Ray cluster for their nodes ahead of time."""
    from pagedray.cluster.executors.placement import Placer
    from pagedray.cluster.executors.ray_utils import can_have, init_ray
    from pagedray.cluster.serving.autoscaler import Autoscaler, RayResourceRequest
    init_ray()
    if kwargs["device"] == "auto":
        # Decided by the nodes the cluster has or can launch: a CPU head with GPU nodes still at zero is a GPU cluster.
        kwargs = {**kwargs, "device": "cuda" if can_have("GPU") else "cpu"}
    logger.info("starting %d replica(s) in Ray actors (min %d, max %d)", scaling.initial_replicas,
                scaling.min_replicas, scaling.max_replicas)
    placer = Placer()   # one for all replicas: they spread over nodes and avoid a failed one's nodes
    make = lambda n: _make_client(model, kwargs, "ray", n, placer)  # noqa: E731
    # The autoscaler is asked for whole replica groups: one bundle per stage (a node that holds its ranks).
    return Autoscaler(frontend.router, make, scaling,
                      resource_request=RayResourceRequest(make("shape").shape().bundles))


async def _run(model: str, kwargs: dict, name: str, args: argparse.Namespace, scaling) -> int:
    """The frontend over its replicas: Ray actors under the autoscaler, or one local engine (a
    subprocess, or a thread for inproc) restarted when it dies."""
    from pagedray.common.errors import EngineDeadError
    from pagedray.cluster.serving.frontend import Frontend
    backend, names = args.replica_backend, itertools.count()
    frontend_kwargs = dict(max_migrations=args.max_migrations, max_pending_requests=args.max_pending_requests)
    autoscaler = None
    try:
        if backend == "ray":
            frontend = Frontend(**frontend_kwargs)
            autoscaler = _ray_autoscaler(frontend, model, kwargs, scaling)
            await autoscaler.start()
        else:
            async def replacement():
                return _make_client(model, kwargs, backend, f"{backend}-{next(names)}")
            frontend = await Frontend.start_with([await replacement()], client_factory=replacement, **frontend_kwargs)
    except (ValueError, EngineDeadError) as exc:
        if autoscaler is not None:
            await autoscaler.stop()
        if isinstance(exc, ValueError):
            raise   # a bad model or setting: main() prints it as the one-line error
        raise SystemExit(f"pagedray serve: no replica could start: {exc}")
    return await _run_server(frontend, name, args, autoscaler)


async def _run_server(frontend, name: str, args: argparse.Namespace, autoscaler=None) -> int:
    from pagedray.cluster.serving.server import GenerateServer
    auth_token, chat_template = args.auth_token, args.chat_template_text
    server = None
    try:   # whatever fails here (a setting, a port taken), the engines must not outlive us (nor hang the exit)
        register_lora_modules(frontend, name, args)
        server = GenerateServer(
            frontend, name, host=args.host, port=args.port, auth_token=auth_token,
            tls_cert=args.tls_cert_pem, tls_key=args.tls_key_pem,
            metrics_port=args.metrics_port, chat_template=chat_template)
        await server.start()
        http = await _start_http(server, name, args, auth_token, chat_template)
    except BaseException:
        if autoscaler is not None:
            await autoscaler.stop()
        if server is not None:
            await server.server.stop(0)
        await frontend.shutdown()
        raise
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    metrics = f", metrics on http://{args.host}:{server.metrics_port}/metrics" if server.metrics_port else ""
    metrics += f", OpenAI HTTP API on {http.url}/v1" if http is not None else ""
    where = f"serving model {name!r} on {args.host}:{server.port} ({'tls' if args.tls_cert else 'plaintext'}){metrics}"
    from pagedray.cluster.core.process import freeze_heap
    freeze_heap()   # the front's start-up heap (torch, Ray, tokenizer) out of the collector's full passes
    announce = loop.create_task(_announce_ready(frontend, where, autoscaler, stop))
    await stop.wait()
    announce.cancel()
    logger.info("draining (up to %.0f s; Ctrl-C again to stop at once)", args.drain_timeout)
    drain = asyncio.create_task(_drain(server, http, autoscaler, args.drain_timeout))
    for sig in (signal.SIGINT, signal.SIGTERM):   # a second signal cuts the drain short
        loop.add_signal_handler(sig, drain.cancel)
    try:
        await drain
    except asyncio.CancelledError:
        logger.warning("second signal: stopping now, cancelling %d request(s)", frontend.num_pending)
        await server.stop(0)
        if http is not None:
            await http.stop()
    logger.info("stopped")
    return 0


async def _drain(server, http, autoscaler, timeout: float) -> None:
    if autoscaler is not None:
        await autoscaler.stop()
    if http is not None:
        http.draining = True   # new HTTP calls get 503; in-flight ones drain with gRPC's below
    await server.stop(timeout)
    if http is not None:
        await http.stop()


async def _announce_ready(frontend, where: str, autoscaler, stop: asyncio.Event) -> None:
    """Log "ready" once every initial replica is up; until then say how many are (serving starts with
    the first, but a cluster with a replica still missing is not what was asked for)."""
    want = autoscaler.config.initial_replicas if autoscaler is not None else 1
    if frontend.num_ready_replicas < want:
        logger.info("listening: %s, %d/%d replica(s) ready; the rest are starting", where,
                    frontend.num_ready_replicas, want)
    while frontend.num_ready_replicas < want and not stop.is_set():
        await asyncio.sleep(0.2)
    if not stop.is_set():
        logger.info("ready: %s, %d/%d replica(s) ready", where, frontend.num_ready_replicas, want)


async def _start_http(server, name: str, args: argparse.Namespace, auth_token, chat_template):
    """The OpenAI HTTP API on the gRPC server's frontend (same engines, tokenizer and metrics)."""
    if args.http_port is None:
        return None
    from pagedray.cluster.serving.http_server import HttpServer
    frontend = server.frontend
    http = HttpServer(frontend, name, host=args.host, port=args.http_port, auth_token=auth_token,
                      tls_cert=args.tls_cert, tls_key=args.tls_key, chat_template=chat_template,
                      tool_call_parser=args.tool_call_parser)
    await http.start()
    return http


# -- client --------------------------------------------------------------------------------
def add_client_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "client", help="call a running server",
        description="Call a `pagedray serve`. Sampling flags left unset take vLLM's defaults on the server: "
                    "temperature 1 (random sampling, so the text changes from run to run; --temperature 0 "
                    "is greedy), top_p 1, top_k off, max_tokens 16, n 1.")
    p.add_argument("--address", default="127.0.0.1:50051", help="host:port of the server")
    p.add_argument("--model", default="", help="model name to ask for (default: the served model)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--token-ids", help="comma-separated prompt token ids")
    p.add_argument("--max-tokens", type=int, help="tokens to generate per completion (server default 16)")
    p.add_argument("--temperature", type=float, help="0 is greedy (server default 1: random sampling)")
    p.add_argument("--top-p", type=float, help="nucleus sampling mass, in (0, 1] (server default 1)")
    p.add_argument("--top-k", type=int, help="keep the k most likely tokens (server default: all)")
    p.add_argument("--seed", type=int, help="per-request seed: the same seed gives the same text")
    p.add_argument("--n", type=int, help="completions per prompt, printed one by one under a label (default 1)")
    p.add_argument("--logprobs", type=int, help="also return each token's logprob and the top-N (--json shows them)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable); not printed")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past the eos token")
    p.add_argument("--stream", action="store_true", help="print text as it arrives")
    p.add_argument("--json", action="store_true", help="print the responses as JSON")
    p.add_argument("--list-models", action="store_true")
    p.add_argument("--health", action="store_true", help="print the health status")
    p.add_argument("--auth-token-file", type=Path, help="file holding the bearer token the server wants")
    p.add_argument("--tls-ca", type=Path, help="CA certificate: connect over TLS")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per call")
    p.set_defaults(func=_client)


def _client(args: argparse.Namespace) -> int:
    import grpc
    from google.protobuf import json_format
    from pagedray.protos import generate_pb2 as pb
    from pagedray.protos import generate_pb2_grpc as pb_grpc

    request = None if args.health or args.list_models else _client_request(args, pb)
    ca = read_flag_file(args.tls_ca, "--tls-ca", binary=True)
    token = read_flag_file(args.auth_token_file, "--auth-token-file")
    channel = (grpc.secure_channel(args.address, grpc.ssl_channel_credentials(ca))
               if ca else grpc.insecure_channel(args.address))
    metadata = [("authorization", f"Bearer {token.strip()}")] if token else []
    try:
        if args.health:
            from grpc_health.v1 import health_pb2, health_pb2_grpc
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                              timeout=args.timeout)
            print(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
            return 0
        stub = pb_grpc.GenerationStub(channel)
        if args.list_models:
            reply = stub.ListModels(pb.ListModelsRequest(), timeout=args.timeout, metadata=metadata)
            print(json_format.MessageToJson(reply))
            return 0
        if args.stream:
            _print_stream(stub.GenerateStream(request, timeout=args.timeout, metadata=metadata), args.json,
                          several=(args.n or 1) > 1)
            return 0
        reply = stub.Generate(request, timeout=args.timeout, metadata=metadata)
        if args.json:
            print(json_format.MessageToJson(reply))
        else:
            _print_completions({c.index: c.text for c in reply.completions},
                               {c.index: c.finish_reason for c in reply.completions})
        return 0
    except grpc.RpcError as err:
        print(f"error: {err.code().name}: {err.details()}", file=sys.stderr)
        return 1
    finally:
        channel.close()


def _print_stream(replies, as_json: bool, several: bool) -> None:
    """One completion streams as it arrives; several (--n > 1) are collected and printed labelled."""
    from google.protobuf import json_format
    texts: dict[int, str] = {}
    reasons: dict[int, int] = {}
    for reply in replies:
        if as_json:
            print(json.dumps(json_format.MessageToDict(reply)), flush=True)
        for c in reply.completions:
            texts[c.index] = texts.get(c.index, "") + c.text
            reasons[c.index] = c.finish_reason or reasons.get(c.index, 0)
            if not (as_json or several):
                print(c.text, end="", flush=True)
    if not as_json:
        _print_completions(texts, reasons) if several else print()


def _print_completions(texts: dict[int, str], reasons: dict[int, int]) -> None:
    """One completion: its text alone; several: each under a `--- sample i (finish: ...) ---` label."""
    from pagedray.protos import generate_pb2 as pb
    if len(texts) == 1:
        print(next(iter(texts.values())))
        return
    # The same label as `pagedray generate` prints.
    for index in sorted(texts):
        reason = pb.FinishReason.Name(reasons.get(index, 0)).removeprefix("FINISH_REASON_").lower()
        print(f"--- sample {index} (finish: {reason}) ---")
        print(texts[index])


def _client_request(args: argparse.Namespace, pb):
    if args.prompt is None and args.token_ids is None:
        raise ValueError("give --prompt or --token-ids (or --list-models / --health)")
    sampling = pb.SamplingParams(stop=args.stop, ignore_eos=args.ignore_eos)
    for name in ("max_tokens", "temperature", "top_p", "top_k", "seed", "n", "logprobs"):
        value = getattr(args, name)
        if value is not None:
            setattr(sampling, name, value)
    request = pb.GenerateRequest(model=args.model, sampling=sampling)
    if args.token_ids is not None:
        try:
            ids = [int(t) for t in args.token_ids.split(",") if t.strip()]
        except ValueError as exc:
            raise ValueError(f"--token-ids must be comma-separated integers ({exc})") from None
        request.prompt_token_ids.ids.extend(ids)
    else:
        request.prompt = args.prompt
    return request


# -- entry point -----------------------------------------------------------------------------
_SUBCOMMANDS = [add_serve_parser, add_client_parser, add_generate_parser, add_chat_parser, add_info_parser]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagedray", description="pagedray inference cluster")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add in _SUBCOMMANDS:
        add(subparsers)
    for sub in subparsers.choices.values():
        sub.formatter_class = DefaultsHelpFormatter
    return parser


def quiet_grpc_logs() -> None:
    """gRPC's C core logs to stderr on its own ("Got goaway", "add_port.cc"), into a client's streamed
    text; the CLI's own errors say what failed, once. Before grpc is imported; GRPC_VERBOSITY wins."""
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")


def main(argv: list[str] | None = None) -> int:
    """Run a subcommand; a user's mistake (bad flag value, model folder, device, file, port) is one
    line on stderr and exit code 2, not a traceback."""
    args = build_parser().parse_args(argv)
    quiet_grpc_logs()
    try:
        return args.func(args)
    except (ValueError, OSError, ImportError) as exc:
        print(f"pagedray {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
