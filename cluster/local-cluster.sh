#!/usr/bin/env bash
# A real multi-node Ray cluster on this machine: one head and N-1 worker nodes started with
# `ray start`, all on a loopback address, then `art-ray-metrics demo --address ...` against it.
#
#   bash cluster/local-cluster.sh [--nodes 3] [--steps 4] [--chaos] [--keep-logs]
#
# What it guarantees:
# - Private: its own --temp-dir under a fresh mktemp directory and free ports for every Ray
#   process, so it never touches or collides with another Ray instance on the machine
#   (no `ray stop`, which would stop every Ray of the user).
# - Stops everything it started BY PID: each `ray start --block` runs in the foreground of a
#   background job whose PID we keep; on exit (success, failure, Ctrl-C) we TERM those PIDs
#   and every process below them, then KILL whatever is left after a grace period.
# - Checks the demo: exit code 0, one history row per step, and producers on every node.
# - Keeps the run: its storage is ./runs/cluster-demo-<time> under the repository (override the
#   parent with ARM_CLUSTER_RUNS), so the demo's "inspect it" hint works after the script ends.
#
# Ray 2.60 specifics handled here:
# - Token authentication is on by default for new clusters: RAY_AUTH_MODE=disabled is exported
#   for every process of this throw-away loopback cluster. (On a real cluster keep it on.)
# - `ray start` refuses worker nodes when RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, and with it on
#   Ray rewrites "127.0.0.1" to the host's interface address. So the cluster binds the loopback
#   alias 127.0.0.2 (any 127.x is loopback on Linux; set ARM_CLUSTER_IP to change it), which Ray
#   keeps as given. Nothing listens on a non-loopback interface.
set -euo pipefail

NODES=3
STEPS=4
CHAOS=""
KEEP_LOGS=0
while [ $# -gt 0 ]; do
  case "$1" in
    --nodes) NODES="$2"; shift 2 ;;
    --steps) STEPS="$2"; shift 2 ;;
    --chaos) CHAOS="--chaos"; shift ;;
    --keep-logs) KEEP_LOGS=1; shift ;;
    -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
    *) echo "local-cluster.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
if ! [ "$NODES" -ge 1 ] 2>/dev/null || ! [ "$STEPS" -ge 1 ] 2>/dev/null; then
  echo "local-cluster.sh: expected --nodes >= 1 and --steps >= 1 but got $NODES, $STEPS" >&2
  exit 2
fi

ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/arm-cluster.XXXXXX")
IP="${ARM_CLUSTER_IP:-127.0.0.2}"
PIDS=()

export RAY_AUTH_MODE=disabled
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1
export RAY_USAGE_STATS_ENABLED=0
export WANDB_MODE="${WANDB_MODE:-disabled}"
unset RAY_ADDRESS

log() { echo "[local-cluster] $*"; }

# Every PID at or below the given PIDs (children first-found order; parents included).
tree_of() {
  ps -eo pid=,ppid= | awk -v roots="$*" '
    BEGIN { n = split(roots, r, " "); for (i = 1; i <= n; i++) keep[r[i]] = 1 }
    { parent[$1] = $2 }
    END {
      changed = 1
      while (changed) {
        changed = 0
        for (p in parent) if ((parent[p] in keep) && !(p in keep)) { keep[p] = 1; changed = 1 }
      }
      for (p in keep) print p
    }'
}

cleanup() {
  local code=$?
  trap - EXIT INT TERM
  if [ ${#PIDS[@]} -gt 0 ]; then
    local all
    all=$(tree_of "${PIDS[@]}")
    log "stopping ${#PIDS[@]} Ray node(s) ($(echo "$all" | wc -w) processes) by PID"
    # workers first, then the head: the head's GCS outliving them keeps the shutdown quiet
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do kill -TERM "${PIDS[$i]}" 2>/dev/null || true; done
    for _ in $(seq 1 30); do
      local alive=0
      for pid in $all; do kill -0 "$pid" 2>/dev/null && alive=$((alive + 1)); done
      [ "$alive" -eq 0 ] && break
      sleep 0.5
    done
    for pid in $all; do
      if kill -0 "$pid" 2>/dev/null; then
        log "killing leftover process $pid"
        kill -KILL "$pid" 2>/dev/null || true
      fi
    done
  fi
  if [ $code -ne 0 ]; then
    log "FAILED (exit $code); last log lines:"
    tail -n 30 "$WORK"/*.log 2>/dev/null || true
  fi
  if [ $code -ne 0 ] || [ "$KEEP_LOGS" -eq 1 ]; then
    log "logs kept in $WORK"
  else
    rm -rf "$WORK"
  fi
  exit $code
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
  python - <<'EOF'
import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
s.close()
EOF
}

# The loopback alias must be usable (Linux: all of 127/8 is loopback).
if ! python -c "import socket, sys; s = socket.socket(); s.bind((sys.argv[1], 0)); s.close()" "$IP" 2>/dev/null; then
  echo "local-cluster.sh: cannot bind $IP; set ARM_CLUSTER_IP to a loopback address this machine has" >&2
  exit 2
fi

node_ports() {
  echo "--node-manager-port $(free_port) --object-manager-port $(free_port)" \
    "--dashboard-agent-listen-port $(free_port) --dashboard-agent-grpc-port $(free_port)" \
    "--metrics-export-port $(free_port) --runtime-env-agent-port $(free_port)"
}

# Start one node in the foreground of a background job; remember the job's PID.
start_node() {
  local name=$1; shift
  # shellcheck disable=SC2046
  ray start --block --disable-usage-stats --node-ip-address "$IP" --num-cpus 1 \
    --temp-dir "$WORK/ray" $(node_ports) "$@" >"$WORK/$name.log" 2>&1 &
  PIDS+=($!)
  local pid=$!
  for _ in $(seq 1 120); do
    if grep -q "block forever" "$WORK/$name.log" 2>/dev/null; then return 0; fi
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "local-cluster.sh: ray start for $name exited early" >&2
      return 1
    fi
    sleep 0.5
  done
  echo "local-cluster.sh: $name did not start within 60s" >&2
  return 1
}

PORT=$(free_port)
ADDRESS="$IP:$PORT"
log "work dir $WORK; head at $ADDRESS"
start_node head --head --port "$PORT" --ray-client-server-port "$(free_port)" --include-dashboard false
for n in $(seq 1 $((NODES - 1))); do
  start_node "worker$n" --address "$ADDRESS"
done
log "$NODES node(s) started: PIDs ${PIDS[*]}"

RUN="cluster-demo-$(date +%Y%m%d-%H%M%S)"
# every node is on this machine, so a local directory is shared storage; it lives outside the
# temporary work dir (removed on exit) so the demo's "inspect it" hints stay valid
STORAGE="${ARM_CLUSTER_RUNS:-$ROOT/runs}/$RUN"
SUMMARY="$WORK/summary.json"
cd "$WORK"
log "art-ray-metrics demo --address $ADDRESS --steps $STEPS ${CHAOS}"
python -m art_ray_metrics demo --address "$ADDRESS" --expect-nodes "$NODES" \
  --steps "$STEPS" --rollouts $((2 * NODES)) --judges "$NODES" --run "$RUN" \
  --storage "$STORAGE" --summary-json "$SUMMARY" $CHAOS 2>&1 | tee "$WORK/demo.log"

rows=$(python -m art_ray_metrics history "$STORAGE" --split train --format jsonl | wc -l)
nodes_used=$(python -c "import json, sys; print(json.load(open(sys.argv[1]))['nodes_used'])" "$SUMMARY")
if [ "$rows" -ne "$STEPS" ]; then
  echo "local-cluster.sh: expected $STEPS history rows but got $rows" >&2
  exit 1
fi
if [ "$nodes_used" -ne "$NODES" ]; then
  echo "local-cluster.sh: expected producers on $NODES nodes but got $nodes_used" >&2
  exit 1
fi
log "OK: $rows rows, producers on $nodes_used of $NODES nodes"
log "the run stays in $STORAGE: art-ray-metrics inspect $STORAGE"
cd "$ROOT"
