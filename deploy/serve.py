"""Entry script for `ray submit`: the gRPC server, router and autoscaler on this cluster's head node.

    ray up deploy/cluster-gpu.yaml
    ray submit deploy/cluster-gpu.yaml deploy/serve.py -- --model /data/models/my-llama --tensor-parallel-size 4 \
        --min-replicas 1 --max-replicas 4

`ray submit` runs this on the head node. It joins the running cluster (RAY_ADDRESS=auto) and
hands every argument to `pagedray serve` with `--executor ray --host 0.0.0.0 --replica-backend ray`:
each replica's engine runs in a Ray actor and its tensor-parallel ranks are placed on one GPU node
by a STRICT_PACK placement group. `--replicas N` keeps N replicas (a dead one is replaced);
`--min-replicas`/`--max-replicas` let the load (`--target-ongoing-requests` per replica) decide,
and a replica that does not fit on the nodes up makes the Ray autoscaler add one. A TP=1 replica
can pass `--executor local` to run its model inside the engine actor (one GPU, no per-step hop).
The checkpoint folder must exist at the same path on the GPU nodes (each rank reads its own
shard): put it on shared storage or in `file_mounts`.
"""
from __future__ import annotations

import os
import sys

from pagedray.cluster.cli import main

if __name__ == "__main__":
    os.environ.setdefault("RAY_ADDRESS", "auto")
    defaults = ["--executor", "ray", "--host", "0.0.0.0", "--replica-backend", "ray"]
    sys.exit(main(["serve", *defaults, *sys.argv[1:]]))
