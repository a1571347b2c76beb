#!/usr/bin/env bash
# Train on one node under torchrun: one process per GPU when there are GPUs (NCCL), otherwise
# NPROC CPU processes over gloo (a simulated mesh). Arguments go to `python -m longctx.train`.
#
#   launch/train_single_node.sh --config configs/llama_1b_128k.yaml
#   NPROC=4 launch/train_single_node.sh --config configs/tiny.yaml --set train.steps=50
#
# Environment: NPROC (processes; default: the GPU count, or 4 on CPU), PYTHON (default python3),
# MASTER_PORT is chosen by torchrun --standalone. NCCL settings are taken from the environment
# as they are.
set -euo pipefail
PYTHON="${PYTHON:-python3}"
source "$(dirname "${BASH_SOURCE[0]}")/nproc.sh"
longctx_nproc "${NPROC:-}" 4
echo "train_single_node: torchrun --standalone, ${nproc} process(es) ($( (( gpus > 0 )) && echo "GPUs, NCCL" || echo "CPU, gloo"))" >&2
exec "$PYTHON" -m torch.distributed.run --standalone --nnodes 1 --nproc-per-node "$nproc" \
    -m longctx.train "$@"
