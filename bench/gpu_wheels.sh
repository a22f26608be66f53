#!/usr/bin/env bash
# Makes the wheels that travel with the code to a GPU machine without internet that has torch and
# transformers only (bench/gpu_check.sh device --wheels DIR): DeepSpeed (built here, pure Python),
# flash-linear-attention, and what they import beyond torch + transformers, for CPython 3.12 on
# x86_64 Linux (the GPU machine's). Usage: bench/gpu_wheels.sh [DIR]   (default .gpu_wheels)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-.gpu_wheels}"
mkdir -p "$out"
pip="${PYTHON:-.venv/bin/python} -m pip"
DS_BUILD_OPS=0 $pip wheel --quiet --no-deps -w "$out" "deepspeed==0.19.8"
$pip download --quiet --no-deps -d "$out" "flash-linear-attention==0.6.0" "fla-core==0.6.0"
$pip download --quiet --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$out" einops hjson msgpack ninja py-cpuinfo psutil "pydantic>=2"
du -sh "$out"
