#!/usr/bin/env bash
# A Ray cluster on one machine: a head (no CPUs for work) and N worker nodes, each its own
# raylet, with token authentication on. For development and the e2e tests.
#   cluster/local.sh up [--workers N] [--cpus-per-node C]   start, print the submit line
#        [--fake-gpus-per-node G --gpu-type TYPE]             advertise G GPUs of TYPE per worker node
#                                                             (none exist: for ft-ray's fit checks)
#   cluster/local.sh status                                   nodes and resources
#   cluster/local.sh down                                     stop every Ray process it started
# The nodes share this machine's disk: submit with `ft-ray submit --in-place` (or a
# `local://` working_dir), since raylets unpacking one uploaded working dir into the same
# folder delete it under the running driver.
set -euo pipefail

PORT="${FT_RAY_LOCAL_PORT:-6390}"
DASHBOARD_PORT="${FT_RAY_LOCAL_DASHBOARD_PORT:-8265}"
TEMP_DIR="${FT_RAY_LOCAL_TEMP:-/tmp/ft-ray-local}"  # every process of this cluster names it: `down` stops only those
AGENT_PORT_BASE="${FT_RAY_LOCAL_AGENT_PORT_BASE:-52400}"
WORKERS=2
CPUS=3
GPUS=0
GPU_TYPE=""
export RAY_AUTH_MODE=token

usage() { sed -n "2,11p" "$0"; exit 2; }

# Several nodes on one machine: each needs its own agent ports (the defaults would collide).
node_ports() {
  local base=$((AGENT_PORT_BASE + $1 * 10))
  echo "--dashboard-agent-listen-port=$base --dashboard-agent-grpc-port=$((base + 1)) --metrics-export-port=$((base + 2)) --runtime-env-agent-port=$((base + 3))"
}

up() {
  # `ray start` with token auth needs a token: make one (~/.ray/auth_token) on a machine that has
  # none yet; clients on this machine (ft-ray submit, ray job) read the same file.
  if [ -z "${RAY_AUTH_TOKEN:-}" ] && [ -z "${RAY_AUTH_TOKEN_PATH:-}" ]; then
    ray get-auth-token --generate >/dev/null
  fi
  # shellcheck disable=SC2046
  ray start --head --port="$PORT" --temp-dir="$TEMP_DIR" $(node_ports 0) --num-cpus=0 --include-dashboard=true \
    --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" \
    --object-store-memory=500000000 --disable-usage-stats >/dev/null
  for i in $(seq 1 "$WORKERS"); do
    local resources="\"ft_ray_worker_node_$i\": 1"
    [ -n "$GPU_TYPE" ] && resources="$resources, \"accelerator_type:$GPU_TYPE\": 1"
    # shellcheck disable=SC2046
    ray start --address="127.0.0.1:$PORT" --temp-dir="$TEMP_DIR" $(node_ports "$i") --num-cpus="$CPUS" \
      --num-gpus="$GPUS" --resources="{$resources}" --object-store-memory=500000000 --disable-usage-stats >/dev/null
  done
  # The job agent registers a little after `ray start` returns; wait until jobs can be listed.
  for _ in $(seq 1 60); do
    ray job list --address "http://127.0.0.1:$DASHBOARD_PORT" >/dev/null 2>&1 && break
    sleep 1
  done
  echo "ray cluster up: head + $WORKERS worker nodes ($CPUS CPUs each), token authentication on"
  echo "dashboard:  http://127.0.0.1:$DASHBOARD_PORT"
  echo "submit:     RAY_AUTH_MODE=token ft-ray submit configs/tiny-cpu.yaml --in-place --address http://127.0.0.1:$DASHBOARD_PORT"
  echo "   or:      RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:$DASHBOARD_PORT --runtime-env-json '{\"working_dir\": \"local://'\"$PWD\"'\"}' -- ft-ray train configs/tiny-cpu.yaml"
}

down() {
  # Not `ray stop`: that would also stop any other Ray on this machine.
  pkill -TERM -f -- "$TEMP_DIR" 2>/dev/null || true
  for _ in $(seq 1 20); do pgrep -f -- "$TEMP_DIR" >/dev/null || break; sleep 0.5; done
  pkill -KILL -f -- "$TEMP_DIR" 2>/dev/null || true
  echo "ray cluster down"
}

status() { ray status --address="127.0.0.1:$PORT"; }

command="${1:-}"; shift || true
while [ $# -gt 0 ]; do
  case "$1" in
    --workers) WORKERS="$2"; shift 2 ;;
    --cpus-per-node) CPUS="$2"; shift 2 ;;
    --fake-gpus-per-node) GPUS="$2"; shift 2 ;;
    --gpu-type) GPU_TYPE="$2"; shift 2 ;;
    *) usage ;;
  esac
done
case "$command" in
  up) up ;;
  down) down ;;
  status) status ;;
  *) usage ;;
esac
