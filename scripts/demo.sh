#!/usr/bin/env bash
# Runs the CPU demo at TP=2 on two local gloo ranks (creating or reusing ./.venv first).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
. scripts/env.sh
exec torchrun --standalone --nproc_per_node 2 -m parallel_adapters.demo "$@"
