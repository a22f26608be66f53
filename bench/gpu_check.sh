#!/usr/bin/env bash
# The GPU acceptance checks (bench/gpu_check.py) for a machine without internet: finds a Python
# with torch, installs carried wheels into a scratch folder, sets an offline environment, runs a
# tier under a time limit.
#
#   bench/gpu_check.sh device --wheels .gpu_wheels   # one GPU, torch + transformers: <= 5 min
#   bench/gpu_check.sh full                          # after ./install.sh gpu
#   bench/gpu_check.sh --dry-run                     # the checks and what each needs (CI)
#   bench/gpu_check.sh device --smoke                # the device tier's code at toy sizes on CPU
#
# --wheels DIR: wheels made here by bench/gpu_wheels.sh (DeepSpeed, flash-linear-attention and
# what they need beyond torch + transformers), installed without network or dependencies.
# PYTHON picks the interpreter (default: .venv/bin/python, else python3 with torch);
# GPU_CHECK_TIMEOUT the limit in seconds for the whole tier (default 600).
set -euo pipefail
cd "$(dirname "$0")/.."

args=() wheels="" quiet=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --wheels) wheels="$2"; shift 2 ;;
    --wheels=*) wheels="${1#--wheels=}"; shift ;;
    --dry-run|--smoke) quiet=1; args+=("$1"); shift ;;
    *) args+=("$1"); shift ;;
  esac
done

PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  for candidate in .venv/bin/python python3 python; do
    if command -v "$candidate" >/dev/null && "$candidate" -c "import torch" 2>/dev/null; then
      PY="$candidate"; break
    fi
  done
fi
[[ -n "$PY" ]] || { echo "gpu_check: FAIL no python with torch (set PYTHON=...)" >&2; exit 2; }

if [[ -n "$wheels" ]]; then
  site="$(mktemp -d /tmp/gpu_check_site.XXXX)"
  "$PY" -m pip install --quiet --no-index --no-deps --target "$site" "$wheels"/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PATH="$site/bin:$PATH"
  # The carried DeepSpeed's sources lie here, so its CPU Adam build would evict the one cached
  # for the venv's DeepSpeed (torch keys the build folder by op name only).
  export TORCH_EXTENSIONS_DIR="$site/torch_extensions"
fi
if [[ $quiet == 0 ]] && command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv,noheader
fi
"$PY" -c "import sys, torch; print(f'python {sys.version.split()[0]}; torch {torch.__version__} (cuda {torch.version.cuda}, '
          f'{torch.cuda.device_count()} GPUs); cores {__import__(\"os\").cpu_count()}')"

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
exec timeout --signal=TERM --kill-after=15 "${GPU_CHECK_TIMEOUT:-600}" "$PY" bench/gpu_check.py "${args[@]}"
