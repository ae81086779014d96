"""OpenMP's wait policy for torch's CPU threads, chosen before torch loads.

Under libgomp's default policy a thread that has finished its share of an op spins at the barrier
before it sleeps. On a machine busy with other processes those spinning threads take the cores that
the thread still working needs, and every op waits for it: the README's offline example beside two
busy loops took minutes where it takes seconds alone (benchmarks/records/, issue 21). PASSIVE makes
waiting threads sleep at once. libgomp reads the variable once, when torch loads it, so the engine
sets it when `pagedray.cluster` (the package of `LLM`, the CLI and the server) is imported; engine
core processes spawned later inherit it. A policy the user set is kept.
"""
from __future__ import annotations

import logging
import os
import sys

logger = logging.getLogger(__name__)


def prefer_passive_wait() -> None:
    """OMP_WAIT_POLICY=PASSIVE unless the user chose a policy; says so when torch (and so OpenMP)
    was loaded first, where only processes started from here on get it."""
    if "OMP_WAIT_POLICY" in os.environ:
        return
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    if "torch" in sys.modules:
        logger.info("torch was imported before pagedray: this process's OpenMP threads keep spinning at "
                    "barriers (slow on a busy CPU); import pagedray first or set OMP_WAIT_POLICY=PASSIVE")
