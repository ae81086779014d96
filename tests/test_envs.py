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


def _policy_after_import(env: dict, code: str = "import pagedray.cluster") -> str:
    import os
    import subprocess
    import sys
    env = {k: v for k, v in {**os.environ, **env}.items() if v is not None}   # None: unset
    out = subprocess.run([sys.executable, "-c", f"{code}; import os; print(os.environ.get('OMP_WAIT_POLICY'))"],
                         env=env, capture_output=True, text=True, timeout=120, cwd="/")
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_the_engine_makes_openmp_threads_wait_passively_unless_told_otherwise():
    assert _policy_after_import({"OMP_WAIT_POLICY": None}) == "PASSIVE"
    assert _policy_after_import({"OMP_WAIT_POLICY": "ACTIVE"}) == "ACTIVE"
