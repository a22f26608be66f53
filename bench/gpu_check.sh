#!/usr/bin/env bash
# The prepared one-GPU check (bench/gpu_check.py) for a machine without internet: checks the GPU
# and the Python stack, sets an offline environment, runs the check under a time limit.
#
#   bench/gpu_check.sh                       # H200: seq 4096 and 8192, ~1.1B model
#   bench/gpu_check.sh --device cpu --seq 256 --layers 2   # smoke test, a ~3M model
#
# PYTHON picks the interpreter (default: the first of python3, python, .venv/bin/python that
# imports torch and transformers); GPU_CHECK_TIMEOUT the limit in seconds (default 300).
set -euo pipefail
cd "$(dirname "$0")/.."

on_cpu=0
for arg in "$@"; do [[ "$arg" == "cpu" || "$arg" == "--device=cpu" ]] && on_cpu=1; done

if [[ $on_cpu == 0 ]]; then
  if ! command -v nvidia-smi >/dev/null; then
    echo "gpu_check: FAIL nvidia-smi not found (no NVIDIA driver); use --device cpu for a smoke test" >&2
    exit 2
  fi
  nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv,noheader
fi

PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  for candidate in python3 python .venv/bin/python; do
    if command -v "$candidate" >/dev/null && "$candidate" -c "import torch, transformers" 2>/dev/null; then
      PY="$candidate"; break
    fi
  done
fi
if [[ -z "$PY" ]]; then
  echo "gpu_check: FAIL no python with torch and transformers (set PYTHON=...)" >&2
  exit 2
fi
"$PY" - <<'EOF'
import sys, torch, transformers
print(f"python {sys.version.split()[0]}; torch {torch.__version__} (cuda {torch.version.cuda}, "
      f"available {torch.cuda.is_available()}); transformers {transformers.__version__}")
EOF

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONUNBUFFERED=1
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"  # less fragmentation at long lengths
exec timeout --signal=TERM --kill-after=15 "${GPU_CHECK_TIMEOUT:-300}" "$PY" bench/gpu_check.py "$@"
