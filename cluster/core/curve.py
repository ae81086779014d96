"""Authenticated, encrypted core wire across nodes: ZMQ CURVE with keys made per replica.

A core reached over tcp:// (a Ray actor on another node than its driver) binds on its node's cluster
address, which anyone on the cluster network can reach. So the driver makes two key pairs per
replica: the core's (server) and its own (client), and hands the core its secret key and the one
client public key it accepts, through Ray (the actor's constructor arguments). The core's sockets are
CURVE servers with a ZAP handler that admits only that client key: a peer without it fails the
handshake and never gets a frame in or out. ipc:// (driver on the same node) stays plain: the socket
files sit in a directory only this user can open.
"""
from __future__ import annotations

import msgspec
import zmq

ZAP_DOMAIN = "pagedray-core"


class CurveKeys(msgspec.Struct, frozen=True):
    """Z85-encoded keys; the core is given them without `client_secret`."""
    server_public: bytes
    server_secret: bytes
    client_public: bytes
    client_secret: bytes = b""

    @classmethod
    def make(cls) -> "CurveKeys":
        server_public, server_secret = zmq.curve_keypair()
        client_public, client_secret = zmq.curve_keypair()
        return cls(server_public, server_secret, client_public, client_secret)

    def for_core(self) -> "CurveKeys":
        return CurveKeys(self.server_public, self.server_secret, self.client_public)


class _OneClient:
    """ZAP credentials: exactly one client public key (pyzmq calls `callback` with it Z85-encoded)."""

    def __init__(self, client_public: bytes) -> None:
        self.client_public = client_public

    def callback(self, domain: str, key: bytes) -> bool:
        return key == self.client_public


def secure_core(context: zmq.Context, sockets: list[zmq.Socket], keys: CurveKeys):
    """Make `sockets` (not bound yet) CURVE servers admitting only `keys.client_public`; returns the
    ZAP authenticator thread (stop it after closing the sockets)."""
    if not zmq.has("curve"):
        raise RuntimeError("this libzmq has no CURVE support: the core cannot be reached securely over tcp")
    from zmq.auth.thread import ThreadAuthenticator
    auth = ThreadAuthenticator(context)
    auth.start()
    auth.configure_curve_callback(domain=ZAP_DOMAIN, credentials_provider=_OneClient(keys.client_public))
    for sock in sockets:
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_SECRETKEY, keys.server_secret)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.server_public)
        sock.setsockopt_string(zmq.ZAP_DOMAIN, ZAP_DOMAIN)
    return auth


def secure_client(sock: zmq.Socket, keys: CurveKeys) -> None:
    """Make `sock` (not connected yet) a CURVE client of the core whose public key is in `keys`."""
    sock.setsockopt(zmq.CURVE_SERVERKEY, keys.server_public)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.client_public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, keys.client_secret)
