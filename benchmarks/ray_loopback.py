"""For the scripts that start Ray: keep its traffic on 127.0.0.1 (on Linux Ray otherwise listens on the
machine's network address), with no auth token and no usage report, unless the environment already says
otherwise. Torch-free, so that importing it does not change a script's start-up."""
from __future__ import annotations

import os

LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


def keep_ray_on_loopback() -> None:
    """Call before Ray is imported: it reads these variables at import."""
    for name, value in LOOPBACK_ENV.items():
        os.environ.setdefault(name, value)
