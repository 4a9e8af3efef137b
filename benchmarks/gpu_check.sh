#!/usr/bin/env bash
# GPU check: whenever a GPU is at hand (CI has none), run every stage in bf16 for a few steps on a
# Llama-shaped model of about 1B parameters built here with random weights (no download), and
# report generated tokens/s, training tokens/s and peak GPU memory (PPO and RTO, RTO again padded
# to compare with padding-free passes, and the other stages' time and throughput; where vLLM is installed, RTO again with vLLM rollouts). At most 8 minutes on one GPU; the table for the README is written
# to benchmarks/_runs/gpu_check/gpu_check.md, with the card named.
#
#   bash benchmarks/gpu_check.sh                  # one GPU, about 1B parameters
#   bash benchmarks/gpu_check.sh --size tiny      # the same check at test size (CPU, seconds)
#   NPROC=2 bash benchmarks/gpu_check.sh          # the same on 2 GPUs (torchrun, DDP)
#
# Extra arguments go to benchmarks/gpu_check.py (--size, --out).
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC="${NPROC:-1}"
LIMIT="${GPU_CHECK_LIMIT:-480}"  # seconds: the check must fit in 8 minutes
if command -v nvidia-smi > /dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
if [ "$NPROC" -gt 1 ]; then
    exec timeout "$LIMIT" python -m torch.distributed.run --standalone --nproc_per_node "$NPROC" \
        benchmarks/gpu_check.py "$@"
fi
exec timeout "$LIMIT" python benchmarks/gpu_check.py "$@"
