"""Every PAGEDRAY_* variable is read in pagedray/common/envs.py, which documents each; no other
module of the engine, its CLI or the benchmarks reads one itself."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from pagedray.common import envs

REPO = Path(__file__).resolve().parents[1]
READ = re.compile(r"""(environ\.get\(|environ\[|getenv\()\s*["'](PAGEDRAY_\w+)""")
FOLDERS = ("cluster", "workers", "models", "kernels", "common", "protos", "benchmarks")


def test_no_module_but_envs_reads_a_pagedray_variable():
    readers = [f"{path.relative_to(REPO)}: {m.group(2)}"
               for folder in FOLDERS for path in sorted((REPO / folder).rglob("*.py"))
               if path != REPO / "common" / "envs.py"
               for m in READ.finditer(path.read_text())]
    assert readers == []


def test_every_documented_variable_has_a_reader():
    source = (REPO / "common" / "envs.py").read_text()
    for name in envs.VARIABLES:
        assert source.count(f'"{name}"') >= 2, f"{name} is documented but read nowhere"


def test_bad_values_name_the_variable(monkeypatch):
    monkeypatch.setenv("PAGEDRAY_RAY_STEP_TIMEOUT_S", "soon")
    with pytest.raises(ValueError, match="PAGEDRAY_RAY_STEP_TIMEOUT_S must be a number of seconds, got 'soon'"):
        envs.ray_step_timeout_s()
    monkeypatch.setenv("PAGEDRAY_REPLICA_STARTUP_TIMEOUT_S", "-1")
    with pytest.raises(ValueError, match="PAGEDRAY_REPLICA_STARTUP_TIMEOUT_S must be > 0 seconds, got -1"):
        envs.replica_startup_timeout_s()
    monkeypatch.delenv("PAGEDRAY_RAY_STEP_TIMEOUT_S")
    assert envs.ray_step_timeout_s() == 300.0
