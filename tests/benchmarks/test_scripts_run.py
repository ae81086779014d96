"""Every benchmark script starts from the repository root (its --help, each in its own process, all
at once), and so does the README's `python -m pagedray.cluster.demo`: nothing of ours shadows an
installed package there (transformers imports HF's `kernels`) and no script lost an import."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = sorted(p.name for p in (REPO / "benchmarks").glob("*.py") if "__main__" in p.read_text())
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}


def test_every_benchmark_script_answers_help_from_the_root():
    assert len(SCRIPTS) >= 15, SCRIPTS
    procs = {name: subprocess.Popen([sys.executable, f"benchmarks/{name}", "--help"], cwd=REPO, env=ENV,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for name in SCRIPTS}
    failed = {}
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=240)
        if proc.returncode != 0 or "usage:" not in out:
            failed[name] = out[-800:]
    assert not failed, failed


def test_the_demo_runs_from_the_root():
    out = subprocess.run([sys.executable, "-m", "pagedray.cluster.demo"], cwd=REPO, env=ENV,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "'The capital of France is' -> " in out.stdout and "'Hello' -> " in out.stdout
