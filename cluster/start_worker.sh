#!/usr/bin/env bash
# Join this machine to a polaris-rl Ray cluster with its GPUs.
#
#   cluster/start_worker.sh HEAD_IP:6379
#
#   NODE_IP=127.0.0.1 cluster/start_worker.sh 127.0.0.1:6379   # a second node on the head's machine
#
# Another machine joins a head started with BIND=<its address>. A second node on the head's own
# machine joins a loopback head with NODE_IP=127.0.0.1: both nodes stay on 127.0.0.1 and nothing
# listens beyond it (cluster/loopback_ray.py says why that needs its own entry point).
# Env: NODE_IP (Ray's guess: the address that reaches the head), NUM_GPUS (nvidia-smi's count),
# NUM_CPUS, METRICS_PORT (8080; each node on one machine needs its own), TEMP_DIR, BLOCK (0),
# RAY_AUTH_MODE (token | disabled; default token: the head's token in ~/.ray/auth_token,
# $RAY_AUTH_TOKEN_PATH or $RAY_AUTH_TOKEN). Extra arguments go to `ray start` as they are, e.g.
# --labels polaris-role=rollout (what placement.engines.labels selects).
set -euo pipefail
if [ $# -lt 1 ] || [[ "$1" == -* ]]; then
  echo "usage: cluster/start_worker.sh HEAD_IP:PORT [ray start options]" >&2; exit 2
fi
HEAD_ADDRESS="$1"; shift
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
RAY="${RAY:-$([ -x "$ROOT/.venv/bin/ray" ] && echo "$ROOT/.venv/bin/ray" || echo ray)}"
METRICS_PORT="${METRICS_PORT:-8080}"
if [ -z "${NUM_GPUS:-}" ]; then
  NUM_GPUS="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
fi
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
# the run's roles at the priority of the driver and Ray's own processes, not 15 (cluster/connect.py)
export RAY_worker_niceness="${RAY_worker_niceness:-0}"
export PATH="$(dirname "$(command -v "$RAY")"):$PATH"

if [ "$RAY_AUTH_MODE" = token ] && [ -z "${RAY_AUTH_TOKEN:-}" ] && [ ! -s "${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}" ]; then
  echo "start_worker: token auth is on but this machine has no token; copy the head's" \
       "~/.ray/auth_token here (or set RAY_AUTH_TOKEN), or RAY_AUTH_MODE=disabled on every node" >&2
  exit 2
fi

args=(--address "$HEAD_ADDRESS" --num-gpus "${NUM_GPUS:-0}" --metrics-export-port "$METRICS_PORT"
      --disable-usage-stats)
[ -n "${NODE_IP:-}" ] && args+=(--node-ip-address "$NODE_IP")
[ -n "${NUM_CPUS:-}" ] && args+=(--num-cpus "$NUM_CPUS")
[ -n "${TEMP_DIR:-}" ] && args+=(--temp-dir "$TEMP_DIR")
[ "${BLOCK:-0}" = 1 ] && args+=(--block)
echo "start_worker: joining $HEAD_ADDRESS with $NUM_GPUS GPU(s), auth $RAY_AUTH_MODE;" \
     "metrics on :$METRICS_PORT for Prometheus"
if [ "${NODE_IP:-}" = 127.0.0.1 ]; then
  export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0  # the node's processes keep loopback
  exec python "$ROOT/cluster/loopback_ray.py" start "${args[@]}" "$@"  # the python beside $RAY (PATH above)
fi
exec "$RAY" start "${args[@]}" "$@"
