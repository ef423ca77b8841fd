#!/usr/bin/env bash
# The prepared GPU check (benchmarks/bench_gpu.py), run from the repository root on the GPU machine.
# Needs the megatron-core 0.16.1 cp312 wheel under .whl/ (carried; megatron is not installed there) and
# $OUT, the folder that comes back.  Extra arguments go to bench_gpu.py (e.g. --smoke).
# Exit status: bench_gpu.py's (0 all checks pass, 1 a check failed or a correctness part crashed,
# 2 only the timing part crashed), or 3 when the wheel is missing.
set -euo pipefail
: "${OUT:?set OUT to the folder for gpu.json and gpu.log}"
mkdir -p "$OUT"
if ! compgen -G ".whl/*.whl" > /dev/null; then
  echo "gpu_check: no wheel under .whl/ (run from the repository root)" >&2
  exit 3
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD"
export PYTHONUNBUFFERED=1
nvidia-smi -L || echo "gpu_check: nvidia-smi -L failed"
python3 -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'available', torch.cuda.is_available())"
python3 benchmarks/bench_gpu.py --out "$OUT/gpu.json" "$@" 2>&1 | tee "$OUT/gpu.log"
