"""One serving stack for tests that play clients: a tiny engine on a thread, one Frontend, the gRPC
and the HTTP server on 127.0.0.1 (port 0), all on an event loop of a background thread, so tests
call them with plain blocking clients (raw sockets included) and read the server's state."""
from __future__ import annotations

import asyncio
import http.client
import json
import socket
import threading
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pagedray.protos import generate_pb2_grpc as pb_grpc


class ServedStack:
    def __init__(self, ckpt: str, *, max_num_seqs: int = 8, http_kwargs: dict | None = None,
                 chat_template: str | None = None, **engine_kwargs) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="served-stack", daemon=True)
        self._thread.start()
        self.run(self._start(ckpt, max_num_seqs, http_kwargs or {}, chat_template, engine_kwargs), timeout=300)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.grpc.port}")
        self.stub = pb_grpc.GenerationStub(self.channel)

    async def _start(self, ckpt, max_num_seqs, http_kwargs, chat_template, engine_kwargs) -> None:
        from pagedray.cluster.serving.frontend import Frontend
        from pagedray.cluster.serving.http_server import HttpServer
        from pagedray.cluster.serving.inproc_client import InprocClient
        from pagedray.cluster.serving.server import GenerateServer
        self.client = InprocClient.for_model(ckpt, name="inproc", device="cpu", max_num_seqs=max_num_seqs,
                                             **engine_kwargs)
        self.frontend = await Frontend.start_with([self.client])
        self.grpc = GenerateServer(self.frontend, "tiny", port=0, metrics_port=0, chat_template=chat_template,
                                   metrics_header_timeout=1.0)
        await self.grpc.start()
        self.http = HttpServer(self.frontend, "tiny", port=0, chat_template=chat_template, **http_kwargs)
        await self.http.start()

    def run(self, coro, timeout: float = 60.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.channel.close()

        async def stop():
            await self.http.stop()
            await self.grpc.stop(grace=1)
        self.run(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    # -- clients ----------------------------------------------------------------------------
    def post(self, path: str, body, timeout: float = 60.0) -> tuple[int, dict]:
        """POST `body` (a dict, or raw bytes/str sent as is): (status, parsed JSON reply)."""
        raw = body if isinstance(body, bytes) else body.encode() if isinstance(body, str) else json.dumps(body).encode()
        conn = http.client.HTTPConnection("127.0.0.1", self.http.port, timeout=timeout)
        try:
            conn.request("POST", path, raw, {"Content-Type": "application/json"})
            response = conn.getresponse()
            data = response.read()
        finally:
            conn.close()
        try:
            return response.status, json.loads(data)
        except ValueError:
            return response.status, {"raw": data.decode(errors="replace")}

    def completion(self, **body) -> tuple[int, dict]:
        return self.post("/v1/completions", {"model": "tiny", **body})

    def connect(self, port: int | None = None) -> socket.socket:
        return socket.create_connection(("127.0.0.1", port or self.http.port), timeout=30)

    # -- what the server holds ---------------------------------------------------------------
    def health(self) -> int:
        stub = health_pb2_grpc.HealthStub(self.channel)
        return stub.Check(health_pb2.HealthCheckRequest(), timeout=10).status

    def wait_idle(self, timeout: float = 15.0):
        """Stats once nothing is in flight and no KV block is held (AssertionError past `timeout`)."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self.run(self.frontend.get_stats())
            held = (stats.num_used_blocks, stats.num_running, stats.num_waiting, self.frontend.num_pending)
            if held == (0, 0, 0, 0):
                return stats
            if time.monotonic() > deadline:
                raise AssertionError(f"still held {timeout}s after the calls ended: (blocks, running, waiting, "
                                     f"pending) = {held}")
            time.sleep(0.05)

    def canary(self, timeout: float = 60.0) -> float:
        """A small greedy gRPC call that must complete: its latency in seconds."""
        from testkit.grpc_cases import make_request
        start = time.monotonic()
        reply = self.stub.Generate(make_request("canary", temperature=0.0, max_tokens=3, ignore_eos=True),
                                   timeout=timeout)
        assert len(reply.completions[0].token_ids) == 3
        return time.monotonic() - start
