"""The engine core's busy loop, in a process of its own (or a thread of a Ray actor).

The front and the core talk over two ZMQ PUSH/PULL sockets (ipc:// locally, tcp:// to a Ray
actor) carrying multipart frames `[kind, msgpack payload]` (`Wire`). The core binds both.

- front -> core: ADD (list[CoreRequest]), ABORT (list[str]), STATS (no payload), SHUTDOWN.
- core -> front: INFO (EngineInfo, once the core is built), OUTPUTS (one CoreOutputs per step
  that produced anything, and a heartbeat: an empty CoreOutputs with stats, whenever nothing
  was sent for `heartbeat_s`), STATS (EngineStats, in the order asked), FATAL (CoreFailure: the
  core could not start or a step raised; the loop then ends).

The loop drains its input without blocking while there is work, steps, and sends; only when
idle does it block on input, and then at most `heartbeat_s`, so a front can tell an idle core
(heartbeats) from a hung one (silence). A bad request never ends the loop: it comes back as
an aborted CoreOutput carrying the error.

A core process dies with its parent: PR_SET_PDEATHSIG (SIGKILL when the thread that spawned
it exits, so spawn it from a long-lived thread, e.g. the event loop's), backed by a watch
thread on the parent pid (covers the race before prctl and non-Linux).
"""
from __future__ import annotations

import ctypes
import gc
import importlib
import logging
import os
import signal
import sys
import threading
import time
from typing import Any, Callable

import msgspec
import zmq

from pagedray.cluster.core.messages import CoreOutput, CoreOutputs, CoreRequest, EngineInfo, EngineStats

logger = logging.getLogger(__name__)

DEFAULT_CORE_FACTORY = "pagedray.cluster.core.engine_core:EngineCore.from_kwargs"


class CoreStartup(msgspec.Struct, omit_defaults=True):
    """Everything a core process needs to build its engine and reach its front."""
    model: str
    engine_kwargs: dict[str, Any]          # the LLM(...) keywords
    input_address: str                     # the core binds both
    output_address: str
    heartbeat_s: float = 1.0
    core_factory: str = DEFAULT_CORE_FACTORY   # "module:callable(model, **engine_kwargs)"
    env: dict[str, str] = {}
    num_threads: int | None = None         # torch intra-op threads (a Ray actor starts with 1)


class CoreFailure(msgspec.Struct):
    """Why a core stopped: `ValueError` at start-up is a bad model or setting (the caller's)."""
    type_name: str
    message: str


class Wire:
    """Frame kinds and the typed msgpack codecs of both directions."""
    ADD, ABORT, STATS, SHUTDOWN = b"a", b"b", b"s", b"x"        # front -> core
    INFO, OUTPUTS, FATAL = b"i", b"o", b"e"                      # core -> front (and STATS)

    def __init__(self) -> None:
        self.encoder = msgspec.msgpack.Encoder()
        self.requests = msgspec.msgpack.Decoder(list[CoreRequest])
        self.ids = msgspec.msgpack.Decoder(list[str])
        self.outputs = msgspec.msgpack.Decoder(CoreOutputs)
        self.stats = msgspec.msgpack.Decoder(EngineStats)
        self.info = msgspec.msgpack.Decoder(EngineInfo)
        self.failure = msgspec.msgpack.Decoder(CoreFailure)

    def encode(self, obj: Any) -> bytes:
        return self.encoder.encode(obj)


def bind_sockets(context: zmq.Context, input_address: str, output_address: str,
                 before_bind: Callable[[list[zmq.Socket]], None] | None = None) -> tuple[zmq.Socket, zmq.Socket]:
    """The core's input (PULL) and output (PUSH) sockets, bound ("tcp://ip:*" picks a free port:
    read it back with `endpoint`). No queue limits: liveness, not a full queue, tells a stuck peer.
    `before_bind`: e.g. cluster/core/curve.py's secure_core, for a core reached across nodes."""
    inp = context.socket(zmq.PULL)
    out = context.socket(zmq.PUSH)
    if before_bind is not None:
        before_bind([inp, out])
    for sock, address in ((inp, input_address), (out, output_address)):
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.LINGER, 1000)
        sock.bind(address)
    return inp, out


def endpoint(sock: zmq.Socket) -> str:
    return sock.getsockopt_string(zmq.LAST_ENDPOINT)


def build_core(startup: CoreStartup, registrations: dict | None = None) -> Any:
    os.environ.update(startup.env)
    if startup.num_threads:
        import torch
        torch.set_num_threads(startup.num_threads)
    if registrations:
        from pagedray.models.registry import ModelRegistry
        ModelRegistry.register_all(registrations)
    return load_factory(startup.core_factory)(startup.model, **startup.engine_kwargs)


def freeze_heap() -> None:
    """Move every object alive after start-up (the model's modules, torch, Ray) out of the cyclic
    collector's sight: a full collection would otherwise walk that whole heap, tens of ms, in the
    middle of the steps whose small allocations trigger it (benchmarks/replica_transport.py: the first
    128-stream run after start-up lost 25-45 % to it in the front, and the core process ran 0.78x of
    in-process without it). vLLM freezes its engine core's and API server's start-up heaps alike."""
    gc.collect()
    gc.freeze()


def load_factory(path: str) -> Callable[..., Any]:
    module, _, attr = path.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def serve(startup: CoreStartup, inp: zmq.Socket, out: zmq.Socket, registrations: dict | None = None,
          stop: threading.Event | None = None, on_built: Callable[[Any], None] | None = None) -> int:
    """Build the core, announce it, run its loop until SHUTDOWN (or `stop`): the exit code."""
    wire = Wire()
    try:
        core = build_core(startup, registrations)
        info = core.info
        if on_built is not None:
            on_built(core)
        freeze_heap()
    except BaseException as exc:   # reported to the front, which raises it from start()
        if isinstance(exc, ValueError):   # a bad setting: the front says it, once and without a traceback
            logger.debug("engine core failed to start: %s", exc)
        else:
            logger.exception("engine core failed to start")
        out.send_multipart([Wire.FATAL, wire.encode(_failure(exc))])
        return 1
    out.send_multipart([Wire.INFO, wire.encode(info)])
    loop = CoreLoop(core, inp, out, startup.heartbeat_s, wire, stop)
    try:
        loop.run()
        return 0
    except BaseException as exc:   # a step raised: the executor or the model failed
        logger.exception("engine core failed")
        out.send_multipart([Wire.FATAL, wire.encode(_failure(exc))])
        return 1
    finally:
        try:
            core.shutdown()
        except Exception:
            logger.exception("engine core shutdown failed")


def _failure(exc: BaseException) -> CoreFailure:
    return CoreFailure(type(exc).__name__, str(exc) or repr(exc))


class CoreLoop:
    """Drain input, step, send; heartbeats when nothing else was sent for `heartbeat_s`."""

    def __init__(self, core: Any, inp: zmq.Socket, out: zmq.Socket, heartbeat_s: float,
                 wire: Wire | None = None, stop: threading.Event | None = None) -> None:
        self.core, self.inp, self.out = core, inp, out
        self.heartbeat_s = heartbeat_s
        self.wire = wire or Wire()
        self.stop = stop or threading.Event()
        self.poller = zmq.Poller()
        self.poller.register(inp, zmq.POLLIN)
        self.last_sent = self.last_stats = time.monotonic()
        self.errors: list[CoreOutput] = []     # refused requests, sent with the next step's outputs

    def run(self) -> None:
        while not self.stop.is_set():
            busy = self.core.has_unfinished_requests() or bool(self.errors)
            if not self.drain(block=not busy):
                return
            outputs = self.core.step() if self.core.has_unfinished_requests() else CoreOutputs()
            if self.errors:
                outputs.outputs = self.errors + list(outputs.outputs)
                self.errors = []
            if outputs.outputs or time.monotonic() - self.last_sent >= self.heartbeat_s:
                self.send(outputs)

    def drain(self, block: bool) -> bool:
        """Apply every queued message; wait up to a heartbeat for one if `block`. False: SHUTDOWN."""
        timeout_ms = int(self.heartbeat_s * 1000) if block else 0
        while self.poller.poll(timeout_ms):
            if not self.handle(self.inp.recv_multipart(zmq.NOBLOCK)):
                return False
            timeout_ms = 0
        return True

    def send(self, outputs: CoreOutputs) -> None:
        now = time.monotonic()
        if not outputs.outputs or now - self.last_stats >= self.heartbeat_s:
            outputs.stats = self.core.get_stats()   # heartbeats, and a step at least once a heartbeat
            self.last_stats = now
        outputs.timestamp = time.time()
        self.out.send_multipart([Wire.OUTPUTS, self.wire.encode(outputs)], copy=False)
        self.last_sent = now

    def handle(self, frames: list[bytes]) -> bool:
        kind = frames[0] if frames else b""
        payload = frames[1] if len(frames) > 1 else b""
        try:
            if kind == Wire.ADD:
                self.add(payload)
            elif kind == Wire.ABORT:
                self.core.abort(self.wire.ids.decode(payload))
            elif kind == Wire.STATS:
                self.out.send_multipart([Wire.STATS, self.wire.encode(self.core.get_stats())])
            elif kind == Wire.SHUTDOWN:
                return False
            else:
                logger.error("engine core: unknown message kind %r ignored", kind)
        except (msgspec.DecodeError, ValueError, TypeError) as exc:
            logger.error("engine core: bad %r message ignored: %s", kind, exc)
        return True

    def add(self, payload: bytes) -> None:
        try:
            requests = self.wire.requests.decode(payload)
        except msgspec.DecodeError:
            requests = self._decode_one_by_one(payload)
        try:
            self.core.add(requests)
        except Exception:   # a core that raises instead of refusing per request: find the bad ones
            for request in requests:
                try:
                    self.core.add([request])
                except Exception as exc:
                    self.refuse(request.request_id, exc)

    def _decode_one_by_one(self, payload: bytes) -> list[CoreRequest]:
        """A batch that fails to decode as a whole: keep the good requests, refuse the others."""
        good = []
        for raw in msgspec.msgpack.decode(payload):
            try:
                good.append(msgspec.convert(raw, CoreRequest))
            except (msgspec.ValidationError, ValueError, TypeError) as exc:
                rid = raw[0] if isinstance(raw, (list, tuple)) and raw and isinstance(raw[0], str) else None
                if rid is None:
                    logger.error("engine core: request without an id refused: %s", exc)
                else:
                    self.refuse(rid, exc)
        return good

    def refuse(self, request_id: str, exc: BaseException) -> None:
        self.errors.append(CoreOutput(request_id, 0, [], finish_reason="abort", error=str(exc)))


# -- the process ---------------------------------------------------------------------------------
PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when its parent goes (prctl where there is one; a pid watch always)."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            logger.warning("prctl(PR_SET_PDEATHSIG) unavailable; watching the parent pid only")

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(1)

    if os.getppid() != parent_pid:
        os._exit(1)
    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def run_engine_core(startup_bytes: bytes, parent_pid: int, registrations: dict | None = None) -> None:
    """The core process's entry point (multiprocessing spawn target)."""
    die_with_parent(parent_pid)
    # Ctrl-C reaches the whole process group: the front decides when the core stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s core %(levelname)s %(message)s")
    startup = msgspec.msgpack.decode(startup_bytes, type=CoreStartup)
    context = zmq.Context()
    inp, out = bind_sockets(context, startup.input_address, startup.output_address)
    code = serve(startup, inp, out, registrations)
    inp.close()
    out.close()      # lingers up to a second so the last frames (FATAL) reach the front
    context.term()
    sys.exit(code)
