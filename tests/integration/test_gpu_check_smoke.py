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
    assert {"setup", "layers_float64", "layers_float32", "gpt_float32", "moe", "timing_bf16"} <= set(sections)
    assert all(s["status"] == "ok" for s in sections.values()), {k: s["status"] for k, s in sections.items()}
    checks = [c for s in sections.values() for c in s["checks"].values()]
    assert len(checks) >= 20 and all(c["pass"] for c in checks)
    moe = sections["moe"]  # the allgather part runs on the CPU; the CUDA-only parts say why not
    assert len(moe["checks"]) == 4 and moe["alltoall_vs_allgather"]["skipped"].startswith("skipped: no CUDA")
    assert moe["grouped_vs_sequential_bf16"]["skipped"].startswith("skipped: ")


def run_grouped_check(out: str) -> None:
    """bench_gpu's GroupedMLP-vs-SequentialMLP check (bf16) on the CPU, grouped_gemm's gmm replaced
    by the test stand-in (tests/mcore/grouped_gemm_shim.py): the benchmark skips it without CUDA."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_gpu

    from tests.mcore import grouped_gemm_shim

    rep = bench_gpu.Report(out, {})
    with rep.section("setup") as entry:
        bench_gpu.setup(rep, entry)
    grouped_gemm_shim.install()
    tokens = torch.randint(0, 100, (2, 17), generator=torch.Generator().manual_seed(11))
    with rep.section("moe_grouped") as entry:
        bench_gpu.check_grouped(rep, entry, tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only branch, with a stand-in for grouped_gemm")
def test_gpu_check_grouped_part_on_cpu_with_gmm_stand_in(tmp_path):
    out = tmp_path / "grouped.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    code = f"from tests.integration.test_gpu_check_smoke import run_grouped_check; run_grouped_check({str(out)!r})"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    section = json.loads(out.read_text())["sections"]["moe_grouped"]
    assert section["status"] == "ok", section.get("traceback")
    assert section["grouped_vs_sequential_bf16"]["host"] == "GroupedExpertsHost"
    checks = section["checks"]
    assert len(checks) == 6 and all(c["pass"] for c in checks.values()), checks
