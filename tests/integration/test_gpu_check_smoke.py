"""The prepared GPU check (benchmarks/bench_gpu.py) stays runnable: its --smoke mode on this
CPU-only box (megatron through mcore/cpu.py, gloo, tiny shapes) must pass every check it makes.
The real run, on one CUDA GPU, is `bash scripts/gpu_check.sh` (see benchmarks/README.md)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the smoke branch is the CPU-only one")
def test_gpu_check_smoke_passes_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--smoke", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["checks_failed"] == []
    sections = report["sections"]
    assert {"setup", "layers_float64", "layers_float32", "gpt_float32", "timing_bf16"} <= set(sections)
    assert all(s["status"] == "ok" for s in sections.values()), {k: s["status"] for k, s in sections.items()}
    checks = [c for s in sections.values() for c in s["checks"].values()]
    assert len(checks) >= 20 and all(c["pass"] for c in checks)
