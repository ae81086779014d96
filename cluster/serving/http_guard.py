"""Slow and greedy senders on the server's HTTP ports (the OpenAI API and the metrics endpoint).

- Headers: a connection that has not sent a whole request head within `header_timeout` (idle,
  or stuck mid-header) is closed (aiohttp's keep-alive timer, armed from the connection's start,
  is exactly that bound: it fires only while no request is being handled).
- Body: a handler reads its body through `read_body`, cut off after `body_timeout` with a 408.
- Connections: at most `max_connections` at once; past it a new one gets a 503 and is closed,
  so half-open sockets cannot pile up to the process's file limit.
The metrics endpoint is served by aiohttp on the event loop, not a thread per connection.
"""
from __future__ import annotations

import asyncio
import ssl

from aiohttp import web

HEADER_TIMEOUT_S = 30.0
BODY_TIMEOUT_S = 30.0
MAX_CONNECTIONS = 1024

_BUSY_BODY = (b'{"error": {"message": "too many open connections: retry later", "type": "service_unavailable", '
              b'"param": null, "code": null}}')
_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
         b"Content-Length: %d\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY))


class BodyTimeout(Exception):
    pass


async def read_body(request: web.Request, timeout: float) -> bytes:
    """The request body, or BodyTimeout when the client has not sent it all within `timeout`."""
    try:
        return await asyncio.wait_for(request.read(), timeout)
    except asyncio.TimeoutError:
        raise BodyTimeout(f"the request body did not arrive within {timeout:g} s") from None


class _Refuse(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(_BUSY)
        transport.close()


class BoundedSite(web.BaseSite):
    """A TCP site of `runner` that takes at most `max_connections` connections at once."""

    def __init__(self, runner: web.AppRunner, host: str, port: int, *, max_connections: int,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        super().__init__(runner, ssl_context=ssl_context)
        self.host, self.requested_port, self.max_connections = host, port, max_connections
        self.port: int | None = None

    @property
    def name(self) -> str:
        return f"{'https' if self._ssl_context else 'http'}://{self.host}:{self.port}"

    @property
    def num_connections(self) -> int:
        return len(self._runner.server.connections)

    async def start(self) -> None:
        await super().start()
        handlers = self._runner.server

        def protocol():
            return _Refuse() if len(handlers.connections) >= self.max_connections else handlers()
        try:
            self._server = await asyncio.get_running_loop().create_server(
                protocol, self.host, self.requested_port, ssl=self._ssl_context, backlog=self._backlog,
                reuse_address=True)
        except OSError as exc:   # e.g. the port was taken since serve checked it
            raise OSError(f"cannot listen on {self.host}:{self.requested_port}: {exc.strerror or exc}") from None
        self.port = self._server.sockets[0].getsockname()[1]


def guarded_runner(app: web.Application, header_timeout: float, **kwargs) -> web.AppRunner:
    """An AppRunner whose connections must send a whole request head within `header_timeout`."""
    return web.AppRunner(app, keepalive_timeout=header_timeout, **kwargs)


class MetricsServer:
    """GET /metrics (Prometheus text) of `registry`, on aiohttp with the same bounds."""

    def __init__(self, registry, host: str, port: int, *, header_timeout: float = 10.0,
                 max_connections: int = 64) -> None:
        self.registry, self.host, self.requested_port = registry, host, port
        self.header_timeout, self.max_connections = header_timeout, max_connections
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    async def start(self) -> int:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        self._runner = guarded_runner(app, self.header_timeout, access_log=None)
        await self._runner.setup()
        site = BoundedSite(self._runner, self.host, self.requested_port, max_connections=self.max_connections)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            raise OSError(f"metrics: {exc}") from None
        self.port = site.port
        return self.port

    async def _metrics(self, request: web.Request) -> web.Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        return web.Response(body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
