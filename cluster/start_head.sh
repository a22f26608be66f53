#!/usr/bin/env bash
# Start the Ray head of a polaris-rl cluster: GCS, dashboard + job API, metrics export.
#
#   cluster/start_head.sh                      # one node, everything on 127.0.0.1
#   BIND=10.0.0.5 cluster/start_head.sh        # a head that other nodes can join
#   BLOCK=1 cluster/start_head.sh              # stay in the foreground; Ctrl-C / SIGTERM stops this node
#
# Env: BIND (127.0.0.1), RAY_PORT (6379), DASHBOARD_PORT (8265), METRICS_PORT (8080),
# NUM_GPUS (nvidia-smi's count), NUM_CPUS (Ray's count), TEMP_DIR (/tmp/ray), BLOCK (0),
# RAY_AUTH_MODE (token | disabled; default token), and Ray's own DASHBOARD_METRIC_PORT (44227) and
# AUTOSCALER_METRIC_PORT (44217): a second cluster on one machine needs other ones. Extra arguments
# go to `ray start` as they are, e.g. --labels polaris-role=learner (placement.learner.labels).
#
# Ray 2.60 facts this script works around:
# - `ray start --node-ip-address 127.0.0.1` swaps loopback for the machine's address unless
#   RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0; the dashboard, job API and metrics exporter follow the
#   node address, so without it they listen on the network.
# - `ray start` turns token auth on only when RAY_AUTH_MODE is unset and a token already exists
#   (~/.ray/auth_token, $RAY_AUTH_TOKEN_PATH or $RAY_AUTH_TOKEN); `ray.init()` turns it on always.
#   We set the mode explicitly so the head does not depend on what is in the home folder.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
RAY="${RAY:-$([ -x "$ROOT/.venv/bin/ray" ] && echo "$ROOT/.venv/bin/ray" || echo ray)}"
BIND="${BIND:-127.0.0.1}"
RAY_PORT="${RAY_PORT:-6379}"
DASHBOARD_PORT="${DASHBOARD_PORT:-8265}"
METRICS_PORT="${METRICS_PORT:-8080}"
if [ -z "${NUM_GPUS:-}" ]; then
  NUM_GPUS="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
fi
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
# the run's roles at the priority of the driver and Ray's own processes, not 15 (cluster/connect.py)
export RAY_worker_niceness="${RAY_worker_niceness:-0}"
export PATH="$(dirname "$(command -v "$RAY")"):$PATH"  # a job's `python` is this venv's (drivers inherit the head's PATH)

args=(--head --node-ip-address "$BIND" --port "$RAY_PORT"
      --dashboard-host 127.0.0.1 --dashboard-port "$DASHBOARD_PORT" --include-dashboard true
      --metrics-export-port "$METRICS_PORT" --num-gpus "${NUM_GPUS:-0}" --disable-usage-stats)
[ -n "${NUM_CPUS:-}" ] && args+=(--num-cpus "$NUM_CPUS")
[ -n "${TEMP_DIR:-}" ] && args+=(--temp-dir "$TEMP_DIR")
[ "${BLOCK:-0}" = 1 ] && args+=(--block)

case "$BIND" in
  127.*|localhost) export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 ;;  # keep the node address on loopback
  *) export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1
     echo "start_head: GCS :$RAY_PORT and metrics :$METRICS_PORT listen on every interface (Ray binds" \
          "them to loopback only on a loopback node): firewall them to the cluster network" ;;
esac

if [ "$RAY_AUTH_MODE" = token ] && [ -z "${RAY_AUTH_TOKEN:-}" ] && [ ! -s "${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}" ]; then
  if [ -n "${RAY_AUTH_TOKEN_PATH:-}" ]; then  # `ray get-auth-token --generate` writes ~/.ray only
    (umask 077; python3 -c 'import secrets; print(secrets.token_hex(32), end="")' > "$RAY_AUTH_TOKEN_PATH")
  else
    "$RAY" get-auth-token --generate >/dev/null
  fi
fi

token_hint=""
if [ "$RAY_AUTH_MODE" = token ]; then
  token_hint="RAY_AUTH_MODE=token "
  token_where="${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}"
  [ -n "${RAY_AUTH_TOKEN:-}" ] && token_where="\$RAY_AUTH_TOKEN"
fi
cat <<EOF
start_head: Ray head on $BIND:$RAY_PORT, $NUM_GPUS GPU(s), auth $RAY_AUTH_MODE
  submit:    ${token_hint}ray job submit --address http://127.0.0.1:$DASHBOARD_PORT --working-dir . \\
               --runtime-env cluster/runtime_env.yaml -- python launch.py conf=polaris
  dashboard: http://127.0.0.1:$DASHBOARD_PORT (from elsewhere: ssh -L $DASHBOARD_PORT:127.0.0.1:$DASHBOARD_PORT <this host>)
  metrics:   http://$BIND:$METRICS_PORT/metrics (Prometheus; polaris_* as ray_polaris_*)
EOF
if [ "$RAY_AUTH_MODE" = token ]; then
  echo "  token:     $token_where (the dashboard asks for it once; clients need RAY_AUTH_MODE=token and the same token)"
fi
if [ "$BIND" != 127.0.0.1 ]; then
  echo "  add nodes: cluster/start_worker.sh $BIND:$RAY_PORT   (with the same token)"
else
  echo "  add a node on this machine: NODE_IP=127.0.0.1 METRICS_PORT=<another> cluster/start_worker.sh" \
       "127.0.0.1:$RAY_PORT --dashboard-agent-listen-port <another>"
fi
exec "$RAY" start "${args[@]}" "$@"
