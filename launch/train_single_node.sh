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
gpus="$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)"
if [[ -n "${NPROC:-}" ]]; then
    nproc="$NPROC"
elif (( gpus > 0 )); then
    nproc="$gpus"
else
    nproc=4
fi
if (( gpus == 0 )) && [[ -z "${OMP_NUM_THREADS:-}" ]]; then
    cores="$(nproc 2>/dev/null || echo 1)"
    export OMP_NUM_THREADS=$(( cores / nproc > 0 ? cores / nproc : 1 ))
fi
echo "train_single_node: torchrun --standalone, ${nproc} process(es) ($( (( gpus > 0 )) && echo "GPUs, NCCL" || echo "CPU, gloo"))" >&2
exec "$PYTHON" -m torch.distributed.run --standalone --nnodes 1 --nproc-per-node "$nproc" \
    -m longctx.train "$@"
