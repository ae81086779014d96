"""Rank actors for the Ray executor's start-up tests."""
from __future__ import annotations

import os
from pathlib import Path

from pagedray.cluster.executors.ray_utils import WorkerActor


class DiesOnceWorker(WorkerActor):
    """Its process exits at start-up the first time each rank is created (a marker file per rank in
    $PAGEDRAY_TEST_MARKER remembers it), as when Ray fails a fresh worker process; then it is a rank."""

    def __init__(self, rank: int, env: dict[str, str]) -> None:
        marker = Path(env["PAGEDRAY_TEST_MARKER"]) / f"rank{rank}"
        if not marker.exists():
            marker.touch()
            os._exit(1)
        super().__init__(rank, env)
