"""What `pagedray serve` checks before it loads a model, so a mistake costs a second, not a model load.

Every failure is a ValueError naming the flag as the user typed it; `main()` prints it as one
`pagedray serve: error: ...` line and exits 2. The checks: the replica counts, the auth token file
(not blank), the TLS pair (PEM, matching), listening beyond loopback without a token (needs
--insecure), the executor for tensor parallelism, and every port (in range, distinct, free now).
"""
from __future__ import annotations

import argparse
import errno
import ipaddress
import re
import socket
import ssl


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def check_serve_args(args: argparse.Namespace) -> None:
    _check_counts(args)
    if args.auth_token_file is not None and not (args.auth_token or "").strip():
        raise ValueError(f"--auth-token-file {str(args.auth_token_file)!r} is empty: it must hold the bearer "
                         "token clients send")
    if args.tls_cert is not None:
        _check_tls(args.tls_cert, args.tls_key)
    if not (args.auth_token or getattr(args, "insecure", False) or is_loopback(args.host)):
        raise ValueError(f"refusing to serve on {args.host} without authentication: pass --auth-token-file FILE "
                         "or set PAGEDRAY_AUTH_TOKEN (clients send it as a bearer token), or --insecure to serve "
                         "anyone who can reach the port")
    check_ports(args.host, [("--port", args.port), ("--http-port", args.http_port),
                            ("--metrics-port", args.metrics_port)])
    if args.replica_backend != "ray" and args.executor != "ray":   # Ray nodes check their own devices
        from pagedray.common.config import DeviceConfig
        DeviceConfig(args.device).check_present()


def _check_counts(args: argparse.Namespace) -> None:
    for flag, value, low in (("--replicas", args.replicas, 1), ("--min-replicas", args.min_replicas, 1),
                             ("--max-replicas", args.max_replicas, 1), ("--max-num-seqs", args.max_num_seqs, 1),
                             ("--max-pending-requests", args.max_pending_requests, 1),
                             ("--tensor-parallel-size", args.tensor_parallel_size, 1),
                             ("--max-migrations", args.max_migrations, 0)):
        if value is not None and value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    if args.min_replicas is not None and args.max_replicas is not None and args.min_replicas > args.max_replicas:
        raise ValueError(f"--min-replicas {args.min_replicas} must be <= --max-replicas {args.max_replicas}")
    if args.tensor_parallel_size > 1 and args.executor != "ray":
        raise ValueError(f"--tensor-parallel-size {args.tensor_parallel_size} needs --executor ray "
                         f"(--executor {args.executor} runs the model in one process)")
    if args.drain_timeout < 0:
        raise ValueError(f"--drain-timeout must be >= 0, got {args.drain_timeout}")


def _check_tls(cert, key) -> None:
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(str(cert), str(key))
    except ssl.SSLError as exc:
        raise ValueError(f"--tls-cert {str(cert)!r} and --tls-key {str(key)!r} are not a matching PEM "
                         f"certificate and private key ({exc.reason or exc})") from None
    except OSError as exc:
        raise ValueError(f"--tls-cert/--tls-key: cannot read them ({exc.strerror or exc})") from None


def check_ports(host: str, ports: list[tuple[str, int | None]]) -> None:
    """Each port in range, none given twice, each free on `host` now (0 picks one later)."""
    seen: dict[int, str] = {}
    for flag, port in ports:
        if port is None:
            continue
        if not 0 <= port <= 65535:
            raise ValueError(f"{flag} must be in [0, 65535], got {port}")
        if port and port in seen:
            raise ValueError(f"{flag} {port} is also {seen[port]}: each endpoint needs its own port")
        seen[port] = flag
    for port, flag in seen.items():
        if port == 0:
            continue
        try:
            family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as the servers bind
                sock.bind((host, port))
        except OSError as exc:
            reason = "the port is in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
            raise ValueError(f"{flag} {port}: cannot listen on {host}:{port}: {reason}") from None


def flag_names(message: str, flags: dict[str, str]) -> str:
    """A config error's field names (`min_replicas`) as the flags that set them (`--min-replicas`)."""
    return re.sub(r"\b[a-z_]+\b", lambda m: flags.get(m.group(0), m.group(0)), message)
