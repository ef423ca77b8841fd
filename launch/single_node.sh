#!/usr/bin/env bash
# One node, NPROC_PER_NODE ranks (default: all GPUs, or 2 CPU ranks without a GPU).
#   NPROC_PER_NODE=8 launch/single_node.sh configs/llama3_8b_tp8.yaml [key=value ...]
set -euo pipefail
if [ -z "${NPROC_PER_NODE:-}" ]; then
  NPROC_PER_NODE=$(python -c "import torch; print(torch.cuda.device_count() or 2)")
fi
exec torchrun --standalone --nproc_per_node "$NPROC_PER_NODE" -m parallel_adapters train "$@"
