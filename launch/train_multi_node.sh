#!/usr/bin/env bash
# Train on several nodes: run this once on every node (same arguments), torchrun with a c10d
# rendezvous at MASTER_ADDR:MASTER_PORT. Arguments go to `python -m longctx.train`.
#
#   # on each of 4 nodes:
#   NNODES=4 NODE_RANK=<0..3> MASTER_ADDR=node0.example MASTER_PORT=29500 \
#       launch/train_multi_node.sh --config configs/llama_8b_1m.yaml
#
# Environment: NNODES, NODE_RANK, MASTER_ADDR (required); MASTER_PORT (default 29500);
# NPROC_PER_NODE (default: the GPU count, or 1 on CPU); RDZV_ID (default longctx-<port>: the
# same on every node of one run); PYTHON (default python3). With c10d the ranks are assigned
# at the rendezvous; NODE_RANK is passed on for the logs. NCCL settings are taken from the
# environment as they are.
set -euo pipefail
: "${NNODES:?set NNODES (the number of nodes)}"
: "${NODE_RANK:?set NODE_RANK (this node: 0 .. NNODES-1)}"
: "${MASTER_ADDR:?set MASTER_ADDR (the host of the rendezvous, e.g. node 0)}"
MASTER_PORT="${MASTER_PORT:-29500}"
PYTHON="${PYTHON:-python3}"
source "$(dirname "${BASH_SOURCE[0]}")/nproc.sh"
longctx_nproc "${NPROC_PER_NODE:-}" 1
echo "train_multi_node: node ${NODE_RANK}/${NNODES}, ${nproc} process(es), rendezvous ${MASTER_ADDR}:${MASTER_PORT}" >&2
exec "$PYTHON" -m torch.distributed.run \
    --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$nproc" \
    --rdzv-backend c10d --rdzv-endpoint "${MASTER_ADDR}:${MASTER_PORT}" \
    --rdzv-id "${RDZV_ID:-longctx-${MASTER_PORT}}" \
    -m longctx.train "$@"
