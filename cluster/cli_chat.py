"""`pagedray chat`: an interactive terminal chat, streaming the answer as it is generated.

With no --address it runs the model in this process (--model, else $PAGEDRAY_MODEL, else the
default model); with --address it talks to a `pagedray serve` over gRPC (the `chat` input, so the
server renders the template). The conversation is kept for the session; /exit (or EOF) leaves.
"""
from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import AsyncIterator, Callable

from pagedray.cluster.cli_common import read_flag_file, resolve_model
from pagedray.cluster.serving.chat import ChatRenderer, load_chat_template

PROMPT = "you> "
ANSWER = "assistant> "
Send = Callable[[list[dict]], AsyncIterator[str]]


def add_chat_parser(subparsers) -> None:
    p = subparsers.add_parser("chat", help="chat with a model in the terminal",
                              description="Interactive chat; type /exit (or Ctrl-D) to leave.")
    p.add_argument("--model", help="HF checkpoint folder (default: $PAGEDRAY_MODEL, else the default model)")
    p.add_argument("--address", help="host:port of a `pagedray serve` to talk to instead of a local model")
    p.add_argument("--auth-token-file", type=Path, help="bearer token for --address")
    p.add_argument("--tls-ca", type=Path, help="CA certificate: connect to --address over TLS")
    p.add_argument("--system", help="a system message opening the conversation")
    p.add_argument("--chat-template", type=Path, help="Jinja chat template file (local model only)")
    p.add_argument("--max-tokens", type=int, default=256, help="tokens per answer at most")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (the default) is greedy")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (local model)")
    p.add_argument("--max-model-len", type=int, help="cap the context length (local model)")
    p.set_defaults(func=run_chat)


def run_chat(args: argparse.Namespace) -> int:
    """Bad flags, files and models raise ValueError/OSError: cli.main prints them as one line."""
    try:
        return asyncio.run(_chat(args))
    except KeyboardInterrupt:
        print()
        return 0


async def _chat(args: argparse.Namespace) -> int:
    from pagedray.common.sampling_params import SamplingParams
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    args.auth_token = read_flag_file(args.auth_token_file, "--auth-token-file")
    args.tls_ca_pem = read_flag_file(args.tls_ca, "--tls-ca", binary=True)
    args.template = load_chat_template(args.chat_template) if args.chat_template else None
    if args.address:
        return await _loop(_remote_sender(args, params), args.system)
    frontend = await _local_frontend(args)
    try:
        return await _loop(_local_sender(frontend, args, params), args.system)
    finally:
        await frontend.shutdown()


async def _loop(send: Send, system: str | None) -> int:
    history = [{"role": "system", "content": system}] if system else []
    while True:
        try:
            line = await asyncio.to_thread(input, PROMPT)
        except EOFError:
            print()
            return 0
        if line.strip() in ("/exit", "/quit"):
            return 0
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        print(ANSWER, end="", flush=True)
        answer = []
        try:
            async for text in send(history):
                print(text, end="", flush=True)
                answer.append(text)
        except ValueError as exc:   # e.g. the conversation outgrew the context: drop this turn
            history.pop()
            print(f"\n[error: {exc}]")
            continue
        print()
        history.append({"role": "assistant", "content": "".join(answer)})


async def _local_frontend(args: argparse.Namespace):
    from pagedray.cluster.serving.frontend import Frontend
    from pagedray.cluster.serving.inproc_client import InprocClient
    client = InprocClient.for_model(resolve_model(args.model), device=args.device, max_model_len=args.max_model_len)
    return await Frontend.start_with([client])


def _local_sender(frontend, args: argparse.Namespace, params) -> Send:
    renderer = ChatRenderer(frontend.tokenizer, args.template)

    async def send(history: list[dict]) -> AsyncIterator[str]:
        async for out in frontend.generate(renderer.prompt(history), params):
            for c in out.outputs:
                yield c.text
    return send


def _remote_sender(args: argparse.Namespace, params) -> Send:
    import grpc

    from pagedray.protos import generate_pb2 as pb
    from pagedray.protos import generate_pb2_grpc as pb_grpc
    channel = (grpc.aio.secure_channel(args.address, grpc.ssl_channel_credentials(args.tls_ca_pem))
               if args.tls_ca_pem else grpc.aio.insecure_channel(args.address))
    stub = pb_grpc.GenerationStub(channel)
    metadata = [("authorization", f"Bearer {args.auth_token.strip()}")] if args.auth_token else []
    sampling = pb.SamplingParams(max_tokens=params.max_tokens, temperature=params.temperature)
    if params.seed is not None:
        sampling.seed = params.seed

    async def send(history: list[dict]) -> AsyncIterator[str]:
        request = pb.GenerateRequest(chat=pb.ChatMessages(messages=[pb.ChatMessage(**m) for m in history]),
                                     sampling=sampling)
        try:
            async for reply in stub.GenerateStream(request, metadata=metadata):
                for c in reply.completions:
                    yield c.text
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise ValueError(err.details()) from err
            raise OSError(f"{err.code().name}: {err.details()}") from err
    return send
