"""The folders of the ZMQ ipc sockets between the front and its engine cores, in the temp folder.

Each is named after the process that made it (`pagedray-core-<pid>-...`), so the next start can
remove those a killed server left (its pid no longer runs); a live server's folders are kept.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

_NAME = re.compile(r"pagedray-(core|actor)-(\d+)-")


def make_ipc_dir(kind: str) -> str:
    """A fresh socket folder for `kind` ("core" or "actor"), after removing the dead ones."""
    remove_stale_ipc_dirs()
    return tempfile.mkdtemp(prefix=f"pagedray-{kind}-{os.getpid()}-")


def remove_stale_ipc_dirs(root: str | None = None) -> list[str]:
    """Remove the socket folders whose maker no longer runs; returns what was removed."""
    removed = []
    for path in Path(root or tempfile.gettempdir()).glob("pagedray-*-*-*"):
        match = _NAME.match(path.name)
        if match and path.is_dir() and not _running(int(match.group(2))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(str(path))
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True     # someone else's live process
    return True
