"""benchmarks/lora_kernels.py --device cpu: both versions of the LoRA kernels (the fee3b59 baseline copy
and kernels/lora_triton.py) run under Triton's interpreter on tiny shapes and match the reference, so the
GPU benchmark's imports and cases stay in working order between GPU runs."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_lora_kernels_benchmark_cpu_smoke():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "benchmarks/lora_kernels.py", "--device", "cpu"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "cpu smoke ok" in run.stdout and run.stdout.count("| new |") == 4, run.stdout
