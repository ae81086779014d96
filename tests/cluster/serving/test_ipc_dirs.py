"""The engine cores' socket folders: a killed server's are removed at the next start, a live one's kept."""
from __future__ import annotations

import os
import subprocess
import sys

from pagedray.cluster.serving.ipc_dirs import make_ipc_dir, remove_stale_ipc_dirs


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_folders_of_dead_servers_go_and_live_ones_stay(tmp_path, monkeypatch):
    dead = _dead_pid()
    stale = [tmp_path / f"pagedray-core-{dead}-abc", tmp_path / f"pagedray-actor-{dead}-def"]
    live = tmp_path / f"pagedray-core-{os.getpid()}-ghi"
    other = tmp_path / f"pagedray-cache-{dead}-x"       # not a socket folder: never touched
    for folder in (*stale, live, other):
        folder.mkdir()
        (folder / "in").write_text("")
    assert sorted(remove_stale_ipc_dirs(str(tmp_path))) == sorted(str(p) for p in stale)
    assert live.exists() and other.exists() and not any(p.exists() for p in stale)

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    (tmp_path / f"pagedray-core-{dead}-jkl").mkdir()
    made = make_ipc_dir("core")          # a start removes what a killed server left
    assert os.path.basename(made).startswith(f"pagedray-core-{os.getpid()}-")
    assert not (tmp_path / f"pagedray-core-{dead}-jkl").exists() and live.exists()
