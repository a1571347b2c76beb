#!/usr/bin/env bash
# Install longctx and its test tools into the current Python environment.
# Where no torch is present, the CPU build of torch 2.13.0 is installed first, so that the
# package's torch requirement is already met and pip does not pull several GB of CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
    "$PYTHON" -m pip install --quiet "torch==2.13.0"
fi
"$PYTHON" -m pip install --quiet -e ".[dev]"
"$PYTHON" -c "import torch, longctx; print(f'longctx {longctx.__version__} on torch {torch.__version__}')"
