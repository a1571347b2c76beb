#!/usr/bin/env bash
# Install longctx and its test tools into the current Python environment.
#
#   bash launch/install.sh                       # longctx with the dev extra (pytest, ruff)
#   bash launch/install.sh transformers megatron # ... and the named extras as well
#
# Where no torch is present, the CPU build of torch 2.13.0 is installed first, so that the
# package's torch requirement is already met and pip does not pull several GB of CUDA wheels.
# The deepspeed extra is installed without building DeepSpeed's CUDA ops (DS_BUILD_OPS=0).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
    "$PYTHON" -m pip install --quiet "torch==2.13.0"
fi
extras="dev"
for extra in "$@"; do
    extras="$extras,$extra"
done
DS_BUILD_OPS=0 "$PYTHON" -m pip install --quiet -e ".[$extras]"
if [[ " $* " == *" deepspeed "* ]]; then
    # DeepSpeed compiles a small shared-memory op on its first start on the CPU; build it here
    # (cached under ~/.cache/torch_extensions), not in the first run or test that starts it.
    "$PYTHON" -c "from deepspeed.accelerator import get_accelerator; \
get_accelerator().create_op_builder('ShareMemCommBuilder').load()" >/dev/null
fi
"$PYTHON" -c "import torch, longctx; print(f'longctx {longctx.__version__} on torch {torch.__version__}')"
