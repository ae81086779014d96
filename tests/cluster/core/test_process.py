"""The core loop (cluster/core/process.py) on inproc:// sockets in a thread, with the fake core."""
from __future__ import annotations

import threading

import msgspec
import pytest
import zmq

from testkit.core_fakes import FakeCore, fake_token

from pagedray.cluster.core.messages import CoreRequest
from pagedray.cluster.core.process import CoreLoop, CoreStartup, Wire, bind_sockets, build_core
from pagedray.common.sampling_params import SamplingParams


class RaisingCore(FakeCore):
    """A core whose add raises for a whole batch when one request is bad (instead of refusing it)."""

    def add(self, requests):
        if any(r.request_id.startswith("bad") for r in requests):
            raise ValueError("bad request in batch")
        super().add(requests)


@pytest.fixture
def wire():
    """(send to the core, receive from the core, stop) around a CoreLoop running in a thread."""
    ctx = zmq.Context()
    inp, out = bind_sockets(ctx, "inproc://in", "inproc://out")
    to_core, from_core = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    to_core.connect("inproc://in")
    from_core.connect("inproc://out")
    stop = threading.Event()
    loop = CoreLoop(RaisingCore(), inp, out, heartbeat_s=0.05, stop=stop)
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    yield to_core, from_core, loop
    stop.set()
    thread.join(5)
    for sock in (to_core, from_core, inp, out):
        sock.close(linger=0)
    ctx.term()


def _frames(from_core, count: int, kind=Wire.OUTPUTS) -> list:
    w, got = Wire(), []
    while len(got) < count:
        assert from_core.poll(10_000), "the core loop sent nothing for 10 s"
        k, payload = from_core.recv_multipart()
        if k == kind:
            got.append(w.outputs.decode(payload) if kind == Wire.OUTPUTS else w.stats.decode(payload))
    return got


def test_idle_heartbeats_carry_stats(wire):
    _, from_core, _ = wire
    beats = _frames(from_core, 3)
    assert all(not b.outputs and b.stats is not None and b.stats.num_total_blocks == 64 for b in beats)


def test_a_core_that_raises_on_add_refuses_only_the_bad_request(wire):
    to_core, from_core, loop = wire
    params = SamplingParams(temperature=0, max_tokens=3)
    batch = [CoreRequest("bad-1", [1], params), CoreRequest("good", [4, 5], params)]
    to_core.send_multipart([Wire.ADD, Wire().encode(batch)])
    tokens, errors = [], {}
    while len(tokens) < 3:
        for out in _frames(from_core, 1)[0].outputs:
            if out.error is not None:
                errors[out.request_id] = out.error
            else:
                tokens.extend(out.new_token_ids)
    assert errors == {"bad-1": "bad request in batch"}
    assert tokens == [fake_token([4, 5], k, 320) for k in range(3)]
    to_core.send_multipart([Wire.STATS])
    assert _frames(from_core, 1, Wire.STATS)[0].num_running == 0


def test_startup_message_roundtrip_and_factory():
    startup = CoreStartup("m", {"vocab_size": 50}, "ipc://a", "ipc://b", core_factory="testkit.core_fakes:FakeCore.from_kwargs")
    decoded = msgspec.msgpack.decode(msgspec.msgpack.encode(startup), type=CoreStartup)
    assert decoded == startup
    assert build_core(decoded).info.vocab_size == 50
