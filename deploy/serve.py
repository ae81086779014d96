"""Entry script for `ray submit`: start the gRPC server with a Ray-executor replica on this cluster.

    ray up deploy/cluster-gpu.yaml
    ray submit deploy/cluster-gpu.yaml deploy/serve.py -- --model /data/models/my-llama --tensor-parallel-size 4

`ray submit` runs this on the head node. It joins the running cluster (RAY_ADDRESS=auto) and
hands every argument to `pagedray serve` with `--executor ray --host 0.0.0.0`; the replica's
tensor-parallel ranks are placed on one GPU node by a STRICT_PACK placement group. The
checkpoint folder must exist at the same path on the GPU nodes (each rank reads its own shard):
put it on shared storage or in `file_mounts`.
"""
from __future__ import annotations

import os
import sys

from pagedray.cluster.cli import main

if __name__ == "__main__":
    os.environ.setdefault("RAY_ADDRESS", "auto")
    defaults = ["--executor", "ray", "--host", "0.0.0.0"]
    sys.exit(main(["serve", *defaults, *sys.argv[1:]]))
