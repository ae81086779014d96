"""Streamed tokens/s: the OpenAI HTTP API against gRPC on the same engine, and the HTTP library choice.

    python benchmarks/http_vs_grpc.py --tiny --device cpu          # engine: one `pagedray serve`
    python benchmarks/http_vs_grpc.py --libs                       # aiohttp vs FastAPI+uvicorn

Engine mode starts one `pagedray serve --http-port 0` and sends, in alternating rounds, the
same burst of --concurrency streaming requests (random token-id prompts, greedy, ignore_eos: each
makes exactly --output-len tokens) over gRPC (GenerateStream) and over HTTP (/v1/completions,
stream, usage in the last chunk). Tokens/s is the burst's output tokens over its wall time.

--libs mode measures only the HTTP library: a stand-in server per library streams --output-len
SSE chunks shaped like ours per request (an event-loop yield between chunks, as one engine step
gives), to the same aiohttp client; chunks/s of each, same rounds.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from serving import make_tiny_checkpoint, one_request, start_server

CHUNK = {"id": "cmpl-0123456789abcdef0123456789abcdef", "object": "text_completion", "created": 0,
         "model": "m", "choices": [{"index": 0, "text": " token", "logprobs": None, "finish_reason": None}]}


# -- clients -------------------------------------------------------------------------------------
async def _grpc_burst(address: str, prompts: list[list[int]], output_len: int) -> int:
    import grpc
    from pagedray.protos import generate_pb2 as pb
    from pagedray.protos import generate_pb2_grpc as pb_grpc
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GenerationStub(channel)
        results = await asyncio.gather(*[one_request(stub, pb, p, output_len) for p in prompts])
    return sum(len(r.tokens) for r in results)


async def _sse(session, url: str, body: dict) -> int:
    """Reads one SSE stream; returns the completion tokens (usage) or else the data chunks seen."""
    chunks, tokens = 0, None
    async with session.post(url, json=body) as response:
        response.raise_for_status()
        async for line in response.content:
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            chunk = json.loads(line[6:])
            chunks += 1
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return tokens if tokens is not None else chunks


async def _http_burst(url: str, bodies: list[dict]) -> int:
    import aiohttp
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=3600)) as session:
        return sum(await asyncio.gather(*[_sse(session, url, b) for b in bodies]))


def _timed(coro) -> tuple[float, int]:
    start = time.perf_counter()
    count = asyncio.run(coro)
    return time.perf_counter() - start, count


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), from /proc: unlike wall time, it
    barely moves with what else runs on a shared machine."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rounds(runs: dict, rounds: int) -> dict[str, dict[str, list[float]]]:
    """Alternate the runs `rounds` times (so drift in machine load hits all alike). `runs` maps a
    name to (make the burst, the serving process's pid); per run: rate per second, and the server's
    and this client's CPU milliseconds per 1000 items."""
    out = {name: {"rate": [], "server_cpu_ms_per_1k": [], "client_cpu_ms_per_1k": []} for name in runs}
    for _ in range(rounds):
        for name, (make, pid) in runs.items():
            server, client = _cpu_seconds(pid), _cpu_seconds(os.getpid())
            seconds, count = _timed(make())
            out[name]["rate"].append(count / seconds)
            out[name]["server_cpu_ms_per_1k"].append(1e6 * (_cpu_seconds(pid) - server) / count)
            out[name]["client_cpu_ms_per_1k"].append(1e6 * (_cpu_seconds(os.getpid()) - client) / count)
    return out


# -- engine mode -----------------------------------------------------------------------------------
def run_engine(args) -> dict:
    from transformers import AutoConfig
    vocab = AutoConfig.from_pretrained(args.model).vocab_size
    rng = random.Random(0)
    prompts = [[rng.randrange(3, vocab) for _ in range(args.input_len)] for _ in range(args.concurrency)]
    bodies = [{"prompt": p, "max_tokens": args.output_len, "temperature": 0, "ignore_eos": True,
               "stream": True, "stream_options": {"include_usage": True}} for p in prompts]
    proc, address, ready = start_server(args, ["--http-port", "0"])
    url = ready.split("OpenAI HTTP API on ")[1].split("/v1")[0] + "/v1/completions"
    try:
        _timed(_grpc_burst(address, prompts[:2], 4))   # connect and warm up both paths
        _timed(_http_burst(url, bodies[:2]))
        return _rounds({"grpc": (lambda: _grpc_burst(address, prompts, args.output_len), proc.pid),
                        "http": (lambda: _http_burst(url, bodies), proc.pid)}, args.rounds)
    finally:
        proc.terminate()
        proc.wait(timeout=120)


# -- library mode ------------------------------------------------------------------------------------
def _fake_server(lib: str, port: int, chunks: int) -> None:
    """A stand-in streaming server: `chunks` SSE chunks per request, one loop yield apart."""
    payload = f"data: {json.dumps(CHUNK)}\n\n".encode()

    async def events():
        for _ in range(chunks):
            await asyncio.sleep(0)
            yield payload
        yield b"data: [DONE]\n\n"

    if lib == "aiohttp":
        from aiohttp import web

        async def handle(request):
            await request.json()
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            async for event in events():
                await response.write(event)
            await response.write_eof()
            return response
        app = web.Application()
        app.router.add_post("/v1/completions", handle)
        web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None, handler_cancellation=True)
    else:
        import uvicorn
        from fastapi import FastAPI, Request
        from fastapi.responses import StreamingResponse
        app = FastAPI()

        async def handle(request):
            await request.json()
            return StreamingResponse(events(), media_type="text/event-stream")
        handle.__annotations__ = {"request": Request}   # this module's annotations are strings
        app.post("/v1/completions")(handle)
        uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_listening(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on port {port}")


def run_libs(args) -> dict:
    servers, urls, pids = [], {}, {}
    try:
        for lib in ("aiohttp", "fastapi+uvicorn"):
            port = _free_port()
            servers.append(subprocess.Popen([sys.executable, __file__, "--fake-server", lib, "--port", str(port),
                                             "--output-len", str(args.output_len)]))
            _wait_listening(port)
            urls[lib] = f"http://127.0.0.1:{port}/v1/completions"
            pids[lib] = servers[-1].pid
        bodies = [{"prompt": "x", "stream": True}] * args.concurrency
        for url in urls.values():
            _timed(_http_burst(url, bodies[:2]))
        return _rounds({lib: ((lambda url=url: _http_burst(url, bodies)), pids[lib]) for lib, url in urls.items()},
                       args.rounds)
    finally:
        for server in servers:
            server.terminate()
            server.wait(timeout=30)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--libs", action="store_true", help="compare HTTP libraries on a stand-in server")
    p.add_argument("--model")
    p.add_argument("--tiny", action="store_true", help="build a tiny random Llama in a temp dir")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--load-format", default="auto")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--num-kv-blocks", type=int)
    p.add_argument("--fake-server", choices=("aiohttp", "fastapi+uvicorn"), help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.fake_server:
        _fake_server(args.fake_server, args.port, args.output_len)
        return 0
    args.num_prompts = args.concurrency   # start_server sizes the admission queue from it
    if args.libs:
        rates = run_libs(args)
    else:
        if args.device == "auto":
            import torch
            args.device = "cuda" if torch.cuda.is_available() else "cpu"
        tmp = tempfile.TemporaryDirectory() if args.tiny else None
        args.model = make_tiny_checkpoint(tmp.name) if tmp else args.model
        if not args.model:
            p.error("give --model PATH, --tiny or --libs")
        rates = run_engine(args)
    first = next(iter(rates))
    report = {}
    for name, series in rates.items():
        report[name] = {}
        for metric, values in series.items():
            median = statistics.median(values)
            report[name][metric] = {"per_round": [round(v, 1) for v in values], "median": round(median, 1),
                                    f"vs_{first}": round(median / statistics.median(rates[first][metric]), 3)}
    print(json.dumps({"mode": "libs" if args.libs else "engine", "concurrency": args.concurrency,
                      "output_len": args.output_len, "cpus": os.cpu_count(), "results": report}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
