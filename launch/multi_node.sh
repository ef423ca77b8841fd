#!/usr/bin/env bash
# Several nodes with c10d rendezvous. Run the same command on every node:
#   NNODES=4 NODE_RANK=<0..3> MASTER_ADDR=node0 MASTER_PORT=29500 NPROC_PER_NODE=8 \
#     launch/multi_node.sh configs/llama3_70b_tp8_pp4.yaml [key=value ...]
# Extra torchrun flags (e.g. --max-restarts 3) go in TORCHRUN_ARGS.
set -euo pipefail
: "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}" "${MASTER_ADDR:?set MASTER_ADDR}"
MASTER_PORT="${MASTER_PORT:-29500}"
NPROC_PER_NODE="${NPROC_PER_NODE:-$(python -c "import torch; print(torch.cuda.device_count() or 2)")}"
# shellcheck disable=SC2086
exec torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc_per_node "$NPROC_PER_NODE" \
  --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "${RDZV_ID:-parallel_adapters}" \
  ${TORCHRUN_ARGS:-} -m parallel_adapters train "$@"
