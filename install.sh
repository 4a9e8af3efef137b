#!/usr/bin/env bash
# Install rto (editable, with test tools) into the active Python environment.
#
# torch: an installed torch is kept as it is (your CUDA build stays). Only when there is no torch
# yet is torch 2.13.0 installed first; on a machine whose pip finds the CPU wheel (as on our CI
# machines) that is the CPU build, elsewhere pip picks the build for your platform. Set
# TORCH_INDEX_URL (e.g. https://download.pytorch.org/whl/cpu) to choose the wheel index yourself.
#
# Usage: ./install.sh [EXTRAS]     e.g. ./install.sh dev,tensorboard
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python}
command -v "$PY" >/dev/null 2>&1 || PY=python3
extras=${1:-dev}

if "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "install.sh: keeping the installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
else
  echo "install.sh: installing torch 2.13.0"
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    "$PY" -m pip install "torch==2.13.0" --index-url "$TORCH_INDEX_URL"
  else
    "$PY" -m pip install "torch==2.13.0"
  fi
fi
"$PY" -m pip install -e ".[${extras}]"
echo "install.sh: done; try: rto --help"
