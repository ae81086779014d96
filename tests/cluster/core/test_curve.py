"""The core wire across nodes admits only its driver: CURVE with the replica's keys (core/curve.py)."""
from __future__ import annotations

import time

import zmq
from zmq.utils.monitor import recv_monitor_message

from pagedray.cluster.core.curve import CurveKeys, secure_client, secure_core
from pagedray.cluster.core.process import Wire, bind_sockets, endpoint


def _core(keys: CurveKeys):
    context = zmq.Context()
    box = {}

    def secure(sockets):
        box["auth"] = secure_core(context, sockets, keys.for_core())
    inp, out = bind_sockets(context, "tcp://127.0.0.1:*", "tcp://127.0.0.1:*", secure)
    return context, box["auth"], inp, out


def _client(context: zmq.Context, address: str, keys: CurveKeys | None) -> zmq.Socket:
    sock = context.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 0)
    if keys is not None:
        secure_client(sock, keys)
    return sock


def _handshake_events(monitor: zmq.Socket, timeout_s: float) -> set[int]:
    seen, deadline = set(), time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if monitor.poll(100):
            seen.add(recv_monitor_message(monitor)["event"])
            if seen & {zmq.EVENT_HANDSHAKE_SUCCEEDED, zmq.EVENT_HANDSHAKE_FAILED_AUTH}:
                break
    return seen


def test_the_driver_s_key_gets_in_and_a_wrong_key_or_plain_peer_is_refused():
    keys = CurveKeys.make()
    context, auth, inp, out = _core(keys)
    other = zmq.Context()
    try:
        address = endpoint(inp)
        assert address.startswith("tcp://127.0.0.1:")    # bound where asked, not on every interface
        # A peer with its own key pair, and one that knows the core's public key but not the client's secret.
        strangers = [CurveKeys.make(), CurveKeys(keys.server_public, b"", *zmq.curve_keypair())]
        for stranger in strangers:
            sock = _client(other, address, stranger)
            monitor = sock.get_monitor_socket()
            sock.connect(address)
            sock.send_multipart([Wire.ADD, b"injected"])
            events = _handshake_events(monitor, 5.0)
            assert zmq.EVENT_HANDSHAKE_SUCCEEDED not in events, events
            sock.disable_monitor()
            monitor.close(0)
            sock.close()
        plain = _client(other, address, None)
        plain.connect(address)
        plain.send_multipart([Wire.ADD, b"plain"])
        assert not inp.poll(1000), "a frame from an unauthenticated peer reached the core"
        plain.close()
        # The driver's keys: its frames arrive.
        driver = _client(other, address, keys)
        driver.connect(address)
        driver.send_multipart([Wire.STATS, b""])
        assert inp.poll(5000)
        assert inp.recv_multipart() == [Wire.STATS, b""]
        driver.close()
    finally:
        inp.close(0)
        out.close(0)
        auth.stop()
        context.destroy(0)
        other.destroy(0)
