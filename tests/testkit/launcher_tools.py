"""What the `ray up` launcher tests need on the host, checked before anything starts."""
from __future__ import annotations

import shutil

import pytest


def require_tools(tools: dict[str, str]) -> None:
    """Fail (never skip: .ci/run installs them) naming the apt packages of the tools not found.
    `tools` maps a command or path to its package."""
    missing = [pkg for tool, pkg in tools.items() if not shutil.which(tool)]
    if missing:
        pytest.fail(f"the launcher path needs {' '.join(missing)}: apt-get install -y {' '.join(missing)} "
                    f"(.ci/run does)")
