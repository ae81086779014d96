"""`pagedray` command line: one argparse subparser per subcommand.

Add a subcommand by writing `add_<name>_parser(subparsers)` that sets `func` and
listing it in `_SUBCOMMANDS`.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from pathlib import Path

from pagedray.cluster.cli_generate import add_generate_parser

logger = logging.getLogger("pagedray.serve")


# -- serve ---------------------------------------------------------------------------------
def add_serve_parser(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve a model over gRPC")
    p.add_argument("--model", help="HF checkpoint folder (default: $PAGEDRAY_MODEL)")
    p.add_argument("--served-model-name", help="name clients pass as `model` (default: the folder name)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50051, help="0 picks a free port (logged when ready)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--executor", choices=("local", "ray"), default="local")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--load-format", default="auto", choices=("auto", "safetensors", "dummy"))
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-kv-blocks", type=int)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--max-num-batched-tokens", type=int)
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-pending-requests", type=int, default=1024,
                   help="requests admitted at once; beyond it calls get RESOURCE_EXHAUSTED")
    p.add_argument("--auth-token-file", type=Path,
                   help="file holding the bearer token clients must send (default: $PAGEDRAY_AUTH_TOKEN)")
    p.add_argument("--tls-cert", type=Path)
    p.add_argument("--tls-key", type=Path)
    p.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this port")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds in-flight requests get to finish on SIGTERM/SIGINT")
    r = p.add_argument_group("replicas", "several engines behind one endpoint (needs --replica-backend ray)")
    r.add_argument("--replica-backend", choices=("local", "ray"), default="local",
                   help="local: one engine in this process; ray: each replica's engine in a Ray actor")
    r.add_argument("--replicas", type=int, help="replicas to start with (default: --min-replicas, else 1)")
    r.add_argument("--min-replicas", type=int, help="autoscaling floor (default: --replicas)")
    r.add_argument("--max-replicas", type=int, help="autoscaling ceiling (default: --replicas)")
    r.add_argument("--target-ongoing-requests", type=float, default=16.0,
                   help="in-flight requests per replica the autoscaler aims for")
    r.add_argument("--upscale-delay", type=float, default=30.0, help="seconds more replicas must be wanted first")
    r.add_argument("--downscale-delay", type=float, default=300.0, help="seconds fewer must be wanted first")
    p.set_defaults(func=_serve)


def _scaling_config(args: argparse.Namespace):
    """--replicas/--min-replicas/--max-replicas as an AutoscalingConfig (fixed when min == max)."""
    from pagedray.cluster.autoscaler import AutoscalingConfig
    initial = args.replicas if args.replicas is not None else \
        args.min_replicas if args.min_replicas is not None else 1
    low = args.min_replicas if args.min_replicas is not None else initial
    high = args.max_replicas if args.max_replicas is not None else max(initial, low)
    try:
        config = AutoscalingConfig(min_replicas=low, max_replicas=high, initial_replicas=initial,
                                   target_ongoing_requests=args.target_ongoing_requests,
                                   upscale_delay_s=args.upscale_delay, downscale_delay_s=args.downscale_delay)
    except ValueError as exc:
        raise SystemExit(f"pagedray serve: {exc}")
    if args.replica_backend == "local" and config.max_replicas > 1:
        raise SystemExit("pagedray serve: more than one replica (--replicas/--max-replicas) needs "
                         "--replica-backend ray")
    return config


def _serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    model = args.model or os.environ.get("PAGEDRAY_MODEL")
    if not model:
        raise SystemExit("pagedray serve: --model is required (or set PAGEDRAY_MODEL)")
    if (args.tls_cert is None) != (args.tls_key is None):
        raise SystemExit("pagedray serve: --tls-cert and --tls-key go together")
    scaling = _scaling_config(args)
    kwargs = dict(device=args.device, tensor_parallel_size=args.tensor_parallel_size, executor=args.executor,
                  dtype=args.dtype, load_format=args.load_format, max_model_len=args.max_model_len,
                  max_num_seqs=args.max_num_seqs, block_size=args.block_size, num_kv_blocks=args.num_kv_blocks,
                  gpu_memory_utilization=args.gpu_memory_utilization,
                  max_num_batched_tokens=args.max_num_batched_tokens,
                  enable_prefix_caching=args.enable_prefix_caching,
                  enable_chunked_prefill=args.enable_chunked_prefill, seed=args.seed)
    name = args.served_model_name or Path(model).name
    if args.replica_backend == "ray":
        return asyncio.run(_run_ray_replicas(model, kwargs, name, args, scaling))
    from pagedray.cluster.async_engine import AsyncEngine
    engine = AsyncEngine.from_kwargs(model, max_pending_requests=args.max_pending_requests, **kwargs)
    return asyncio.run(_run_server(engine, name, args))


async def _run_ray_replicas(model: str, kwargs: dict, name: str, args: argparse.Namespace, scaling) -> int:
    """Replicas in Ray actors, kept between --min-replicas and --max-replicas by the autoscaler."""
    from pagedray.cluster.autoscaler import Autoscaler
    from pagedray.cluster.replica import RayReplica
    from pagedray.cluster.router import Router

    from pagedray.cluster.autoscaler import RayResourceRequest
    from pagedray.cluster.executors.ray_utils import can_have, init_ray
    init_ray()
    if kwargs["device"] == "auto":
        # Decided by the nodes the cluster has or can launch: a CPU head with GPU nodes still at zero is a GPU cluster.
        kwargs = {**kwargs, "device": "cuda" if can_have("GPU") else "cpu"}
    resource = "GPU" if kwargs["device"].startswith("cuda") else "CPU"

    def make_replica(replica_name: str) -> RayReplica:
        return RayReplica(model, kwargs, name=replica_name, max_pending_requests=args.max_pending_requests)

    router = Router()
    # Each replica's ranks share one node: one {resource: tp} bundle asks for a node that holds them all.
    autoscaler = Autoscaler(router, make_replica, scaling,
                            resource_request=RayResourceRequest([{resource: kwargs["tensor_parallel_size"]}]))
    logger.info("starting %d replica(s) in Ray actors (min %d, max %d)", scaling.initial_replicas,
                scaling.min_replicas, scaling.max_replicas)
    from pagedray.cluster.async_engine import EngineDeadError
    try:
        await autoscaler.start()
    except (ValueError, EngineDeadError) as exc:
        await autoscaler.stop()
        raise SystemExit(f"pagedray serve: no replica could start: {exc}")
    return await _run_server(router, name, args, autoscaler)


async def _run_server(engine, name: str, args: argparse.Namespace, autoscaler=None) -> int:
    from pagedray.cluster.server import GenerateServer
    server = GenerateServer(
        engine, name, host=args.host, port=args.port,
        auth_token=args.auth_token_file.read_text() if args.auth_token_file else
        os.environ.get("PAGEDRAY_AUTH_TOKEN") or None,
        tls_cert=args.tls_cert.read_bytes() if args.tls_cert else None,
        tls_key=args.tls_key.read_bytes() if args.tls_key else None,
        metrics_port=args.metrics_port)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    metrics = f", metrics on http://{args.host}:{server.metrics_port}/metrics" if server.metrics_port else ""
    logger.info("ready: serving model %r on %s:%d (%s)%s, %d replica(s) ready", name, args.host, server.port,
                "tls" if args.tls_cert else "plaintext", metrics, server.router.num_ready)
    await stop.wait()
    logger.info("draining (up to %.0f s)", args.drain_timeout)
    if autoscaler is not None:
        await autoscaler.stop()
    await server.stop(args.drain_timeout)
    logger.info("stopped")
    return 0


# -- client --------------------------------------------------------------------------------
def add_client_parser(subparsers) -> None:
    p = subparsers.add_parser("client", help="call a running server")
    p.add_argument("--address", default="127.0.0.1:50051")
    p.add_argument("--model", default="", help="empty: the served model")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt")
    src.add_argument("--token-ids", help="comma-separated prompt token ids")
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--n", type=int)
    p.add_argument("--logprobs", type=int)
    p.add_argument("--stop", action="append", default=[])
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--stream", action="store_true", help="print text as it arrives")
    p.add_argument("--json", action="store_true", help="print the responses as JSON")
    p.add_argument("--list-models", action="store_true")
    p.add_argument("--health", action="store_true", help="print the health status")
    p.add_argument("--auth-token-file", type=Path)
    p.add_argument("--tls-ca", type=Path, help="CA certificate: connect over TLS")
    p.add_argument("--timeout", type=float, default=60.0)
    p.set_defaults(func=_client)


def _client(args: argparse.Namespace) -> int:
    import grpc
    from google.protobuf import json_format
    from pagedray.protos import generate_pb2 as pb
    from pagedray.protos import generate_pb2_grpc as pb_grpc

    channel = (grpc.secure_channel(args.address, grpc.ssl_channel_credentials(args.tls_ca.read_bytes()))
               if args.tls_ca else grpc.insecure_channel(args.address))
    metadata = [("authorization", f"Bearer {args.auth_token_file.read_text().strip()}")] \
        if args.auth_token_file else []
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
        request = _client_request(args, pb)
        if args.stream:
            for reply in stub.GenerateStream(request, timeout=args.timeout, metadata=metadata):
                if args.json:
                    print(json.dumps(json_format.MessageToDict(reply)), flush=True)
                else:
                    print("".join(c.text for c in reply.completions), end="", flush=True)
            if not args.json:
                print()
            return 0
        reply = stub.Generate(request, timeout=args.timeout, metadata=metadata)
        if args.json:
            print(json_format.MessageToJson(reply))
        else:
            for c in reply.completions:
                print(c.text)
        return 0
    except grpc.RpcError as err:
        print(f"error: {err.code().name}: {err.details()}", file=sys.stderr)
        return 1
    finally:
        channel.close()


def _client_request(args: argparse.Namespace, pb):
    if args.prompt is None and args.token_ids is None:
        raise SystemExit("pagedray client: give --prompt or --token-ids (or --list-models / --health)")
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
            raise SystemExit(f"pagedray client: --token-ids must be comma-separated integers ({exc})")
        request.prompt_token_ids.ids.extend(ids)
    else:
        request.prompt = args.prompt
    return request


# -- entry point -----------------------------------------------------------------------------
_SUBCOMMANDS = [add_serve_parser, add_client_parser, add_generate_parser]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagedray", description="pagedray inference cluster")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add in _SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
