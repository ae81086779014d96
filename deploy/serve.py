"""Entry script for `ray submit`: the gRPC server, router and autoscaler on this cluster's head node.

    ray up deploy/cluster-gpu.yaml
    ray submit --tmux deploy/cluster-gpu.yaml deploy/serve.py -- --model /data/models/my-llama \
        --tensor-parallel-size 4 --min-replicas 1 --max-replicas 4 --auth-token-file ~/token

`ray submit` runs this on the head node. It joins the running cluster (RAY_ADDRESS, default auto) and
hands every argument to `pagedray serve` with `--executor ray --host 0.0.0.0 --replica-backend ray`:
each replica's engine runs in a Ray actor and its ranks in one placement group (a stage's
tensor-parallel ranks on one node; replicas spread over nodes: README, "Serving a model larger
than one node"). `--replicas N` keeps N replicas (a dead one is replaced);
`--min-replicas`/`--max-replicas` let the load (`--target-ongoing-requests` per replica) decide,
and a replica that fits no node that is up waits while the Ray autoscaler adds one. A TP=1 replica
can pass `--executor local` to run its model inside the engine actor (one GPU, no per-step hop).
The checkpoint folder must exist at the same path on the GPU nodes (each rank reads its own
shard): put it on shared storage or in `file_mounts`.

The server listens on every interface, so it refuses to start without a bearer token
(`--auth-token-file`, or the token itself in $PAGEDRAY_AUTH_TOKEN) unless `--insecure` is given
or `--host` is a loopback address. Add `--tls-cert`/`--tls-key` when clients are off the node.
"""
from __future__ import annotations

import argparse
import ipaddress
import os
import sys

DEFAULTS = ["--executor", "ray", "--host", "0.0.0.0", "--replica-backend", "ray"]


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def serve_argv(argv: list[str], environ=os.environ) -> list[str]:
    """`pagedray serve` arguments for this script's `argv`; SystemExit when the server would listen
    beyond loopback without authentication."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--auth-token-file")
    parser.add_argument("--insecure", action="store_true")
    known, _ = parser.parse_known_args(argv)
    has_token = known.auth_token_file or environ.get("PAGEDRAY_AUTH_TOKEN", "").strip()
    if not (has_token or known.insecure or _is_loopback(known.host)):
        raise SystemExit(f"deploy/serve.py: refusing to serve on {known.host} without authentication: pass "
                         f"--auth-token-file FILE or set PAGEDRAY_AUTH_TOKEN (clients send it as a bearer "
                         f"token), or --insecure to serve anyone who can reach the port")
    return ["serve", *DEFAULTS, *argv]   # serve applies the same rule (and knows --insecure)


if __name__ == "__main__":
    args = serve_argv(sys.argv[1:])
    os.environ.setdefault("RAY_ADDRESS", "auto")
    from pagedray.cluster.cli import main
    sys.exit(main(args))
