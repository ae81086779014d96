"""Every PAGEDRAY_* environment variable the engine, its command line and its benchmarks read, in one
place: each is read here (when asked, not at import, so a test's monkeypatch.setenv takes effect) and
documented in VARIABLES. A bad value raises ValueError naming the variable and the value.

Kernel and engine tuning switches are not environment variables: they are `KernelOptions` in the
engine config, which reaches every worker (an environment variable would reach only some).
The loopback-cluster tools in deploy/local/ set and read their own (PAGEDRAY_RAY_SCOPE and the
node exports): they run on nodes where pagedray need not be importable.
"""
from __future__ import annotations

import os

VARIABLES: dict[str, str] = {
    "PAGEDRAY_MODEL": "checkpoint folder of the CLI when --model is not given (else the default model)",
    "PAGEDRAY_CACHE": "folder of converted models (default: $XDG_CACHE_HOME/pagedray or ~/.cache/pagedray)",
    "PAGEDRAY_AUTH_TOKEN": "bearer token `pagedray serve` requires when --auth-token-file is not given",
    "PAGEDRAY_ENGINE_THREADS": "torch intra-op threads of an engine core process or actor (integer >= 1)",
    "PAGEDRAY_ENGINE_LIVENESS_S": "seconds of silence after which a front declares its core dead (default 10)",
    "PAGEDRAY_REPLICA_STARTUP_TIMEOUT_S": "seconds a replica may take to load its model (default 1800)",
    "PAGEDRAY_RAY_TRANSPORT": "driver -> Ray worker step transport: 'calls' or 'dag' (default: dag on CUDA)",
    "PAGEDRAY_RAY_STEP_TIMEOUT_S": "seconds after which a Ray step counts as hung (default 300)",
    "PAGEDRAY_RAY_STARTUP_TIMEOUT_S": "seconds Ray workers may take to start and load (default 900)",
    "PAGEDRAY_RAY_PLACEMENT_TIMEOUT_S": "seconds to wait for the Ray placement group (default 120)",
    "PAGEDRAY_RAY_CROSS_NODE_TP": "1: a replica's TP ranks may sit on different nodes (default 0: a stage per node)",
    "PAGEDRAY_AUTOSCALING_CONFIG": "Ray autoscaler config file read for node types (default: ray up's on the head)",
    "PAGEDRAY_COMMIT": "commit benchmarks record where the tree has no .git (a copied tree)",
    "PAGEDRAY_RECORDS_DIR": "folder benchmark runs write their records to (default benchmarks/records/)",
}


def _text(name: str) -> str | None:
    if name not in VARIABLES:
        raise KeyError(f"{name} is not a documented PAGEDRAY_* variable (add it to VARIABLES)")
    return os.environ.get(name) or None


def _seconds(name: str, default: float) -> float:
    text = _text(name)
    try:
        value = default if text is None else float(text)
    except ValueError:
        raise ValueError(f"{name} must be a number of seconds, got {text!r}") from None
    if not value > 0:
        raise ValueError(f"{name} must be > 0 seconds, got {value:g}")
    return value


def model() -> str | None:
    return _text("PAGEDRAY_MODEL")


def cache() -> str | None:
    return _text("PAGEDRAY_CACHE")


def auth_token() -> str | None:
    return _text("PAGEDRAY_AUTH_TOKEN")


def engine_threads() -> int | None:
    text = _text("PAGEDRAY_ENGINE_THREADS")
    if text is None:
        return None
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"PAGEDRAY_ENGINE_THREADS must be an integer >= 1, got {text!r}")
    return int(text)


def engine_liveness_s() -> float:
    return _seconds("PAGEDRAY_ENGINE_LIVENESS_S", 10.0)


def replica_startup_timeout_s() -> float:
    return _seconds("PAGEDRAY_REPLICA_STARTUP_TIMEOUT_S", 1800.0)


def ray_transport() -> str | None:
    return _text("PAGEDRAY_RAY_TRANSPORT")


def ray_step_timeout_s() -> float:
    return _seconds("PAGEDRAY_RAY_STEP_TIMEOUT_S", 300.0)


def ray_startup_timeout_s() -> float:
    return _seconds("PAGEDRAY_RAY_STARTUP_TIMEOUT_S", 900.0)


def ray_placement_timeout_s() -> float:
    return _seconds("PAGEDRAY_RAY_PLACEMENT_TIMEOUT_S", 120.0)


def ray_cross_node_tp() -> bool:
    text = _text("PAGEDRAY_RAY_CROSS_NODE_TP") or "0"
    if text not in ("0", "1"):
        raise ValueError(f"PAGEDRAY_RAY_CROSS_NODE_TP must be 0 or 1, got {text!r}")
    return text == "1"


def autoscaling_config() -> str | None:
    return _text("PAGEDRAY_AUTOSCALING_CONFIG")


def commit() -> str | None:
    return _text("PAGEDRAY_COMMIT")


def records_dir() -> str | None:
    return _text("PAGEDRAY_RECORDS_DIR")
