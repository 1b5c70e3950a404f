#!/usr/bin/env bash
# A multi-node Ray cluster on this one machine, for trying endor-ray's distributed mode.
#
#   cluster/local-cluster.sh start [N]   a head node for the GPU worker ({"endor_worker": 1}) and
#                                        N nodes for shard servers ({"endor_shard": 1}), default N=2
#   cluster/local-cluster.sh status      ray status of that cluster
#   cluster/local-cluster.sh stop        stop the nodes this script started (and nothing else)
#
# endor_ray.driver places shard servers only on nodes with the custom resource "endor_shard"
# (SHARD_RESOURCE) and GPU workers on a node with "endor_worker" (WORKER_RESOURCE), so even on one
# machine layers travel between Ray nodes the way they would between machines.
#
# Every node listens on 127.0.0.1 only. Each node runs `ray start --block` in the background; its
# log and the pids are kept in $STATE_DIR, and `stop` ends exactly those processes (each takes its
# node's raylet, workers and agents with it). `ray stop` would also do, but it stops every Ray
# process of this user on the machine, other people's clusters included.
#
# Token authentication: Ray 2.60 enables it when a token exists (~/.ray/auth_token, made by the
# first ray.init() or by `ray get-auth-token --generate`); clients then need RAY_AUTH_MODE=token
# and the same token. For a trial on loopback you may `export RAY_AUTH_MODE=disabled` before
# `start` and in the shell that runs `endor generate` or `ray job submit`. Real clusters keep
# token authentication on (see cluster/README.md).
#
# Settings (environment): RAY (the ray command; default the repo's .venv/bin/ray, else `ray`),
# PORT (GCS, 6379), DASHBOARD_PORT (8265), CLIENT_PORT (Ray client server, 10001),
# AGENT_PORT (dashboard agent of the head, 52365; shard node k uses AGENT_PORT + k) -- pick ports
# outside Ray's worker port range 10002-19999,
# OBJECT_STORE_MEMORY (bytes per node, default 1 GiB), STATE_DIR (/tmp/endor-local-cluster-$PORT).
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${RAY:-}" ]]; then
    if [[ -x "$repo_root/.venv/bin/ray" ]]; then RAY="$repo_root/.venv/bin/ray"; else RAY=ray; fi
fi
PORT="${PORT:-6379}"
DASHBOARD_PORT="${DASHBOARD_PORT:-8265}"
CLIENT_PORT="${CLIENT_PORT:-10001}"
AGENT_PORT="${AGENT_PORT:-52365}"
OBJECT_STORE_MEMORY="${OBJECT_STORE_MEMORY:-1073741824}"
STATE_DIR="${STATE_DIR:-${TMPDIR:-/tmp}/endor-local-cluster-$PORT}"
unset RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER  # =0 makes `ray start --address` refuse to join

usage() {
    sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'
    echo "Settings: RAY PORT DASHBOARD_PORT CLIENT_PORT AGENT_PORT OBJECT_STORE_MEMORY STATE_DIR (see the script)."
}

# Start one node in the background with --block; remember its pid.
start_node() {
    local name="$1"; shift
    setsid "$RAY" start --block --node-ip-address=127.0.0.1 --disable-usage-stats \
        --object-store-memory="$OBJECT_STORE_MEMORY" "$@" >"$STATE_DIR/$name.log" 2>&1 < /dev/null &
    echo "$!" >>"$STATE_DIR/pids"
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

alive_nodes() {
    "$RAY" status --address "127.0.0.1:$PORT" 2>/dev/null | awk '/^Active:/{on=1; next} /^(Pending|Recent failures):/{on=0} on && /node_/{n++} END{print n+0}'
}

cmd_start() {
    local num_shard_nodes="${1:-2}"
    [[ "$num_shard_nodes" =~ ^[0-9]+$ ]] || { echo "N must be a number, got '$num_shard_nodes'" >&2; exit 2; }
    if [[ -s "$STATE_DIR/pids" ]]; then
        echo "a cluster from this script seems to run already ($STATE_DIR/pids); run '$0 stop' first" >&2
        exit 1
    fi
    if port_open "$PORT"; then
        echo "port $PORT is taken (another Ray?); pick another with PORT=..." >&2
        exit 1
    fi
    mkdir -p "$STATE_DIR"
    : >"$STATE_DIR/pids"
    start_node head --head --port="$PORT" --num-cpus=1 --resources='{"endor_worker": 1}' \
        --include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" \
        --ray-client-server-port="$CLIENT_PORT" --dashboard-agent-listen-port="$AGENT_PORT"
    local head_pid
    head_pid="$(head -n 1 "$STATE_DIR/pids")"
    for _ in $(seq 60); do
        port_open "$PORT" && break
        kill -0 "$head_pid" 2>/dev/null || break  # it failed: its log says why
        sleep 1
    done
    port_open "$PORT" || { echo "the head did not start; see $STATE_DIR/head.log" >&2; cmd_stop; exit 1; }
    # Nodes on one machine need their own dashboard-agent port; the other ports are picked free.
    for node_idx in $(seq 1 "$num_shard_nodes"); do
        start_node "shard-$node_idx" --address="127.0.0.1:$PORT" --num-cpus=1 \
            --resources='{"endor_shard": 1}' --dashboard-agent-listen-port=$((AGENT_PORT + node_idx))
    done
    local want=$((num_shard_nodes + 1)) have=0
    for _ in $(seq 30); do
        have="$(alive_nodes)"
        [[ "$have" -ge "$want" ]] && break
        sleep 1
    done
    if [[ "$have" -lt "$want" ]]; then
        echo "only $have of $want nodes came up; see the logs in $STATE_DIR" >&2
        cmd_stop
        exit 1
    fi
    cat <<EOF
Ray on 127.0.0.1: head (endor_worker) + $num_shard_nodes shard nodes (endor_shard). Logs: $STATE_DIR
Token auth: ${RAY_AUTH_MODE:-as Ray decides (on if a token exists)}; clients need the same RAY_AUTH_MODE.
Try it:
  endor generate STORE --address 127.0.0.1:$PORT --prompt "The capital of France is" --max-new-tokens 16
  ray job submit --address http://127.0.0.1:$DASHBOARD_PORT --working-dir . -- \\
      python -m endor_ray.jobs.generate --store STORE --input prompts.jsonl --output out.parquet
Stop it: $0 stop
EOF
}

cmd_stop() {
    [[ -f "$STATE_DIR/pids" ]] || { echo "no cluster from this script ($STATE_DIR/pids missing)"; return 0; }
    local pids
    mapfile -t pids <"$STATE_DIR/pids"
    # Shard nodes first, the head last: each `ray start --block` ends its own node on SIGTERM.
    for (( idx=${#pids[@]}-1; idx>=0; idx-- )); do kill -TERM "${pids[idx]}" 2>/dev/null || true; done
    for _ in $(seq 30); do
        local running=0
        for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && running=1; done
        [[ "$running" == 0 ]] && break
        sleep 1
    done
    for pid in "${pids[@]}"; do
        kill -0 "$pid" 2>/dev/null && { echo "node process $pid did not stop; killing it" >&2; kill -KILL "$pid"; }
    done
    rm -f "$STATE_DIR/pids"
    echo "stopped ${#pids[@]} nodes"
}

case "${1:-}" in
    start) shift; cmd_start "$@" ;;
    stop) cmd_stop ;;
    status) "$RAY" status --address "127.0.0.1:$PORT" ;;
    -h|--help|help|"") usage ;;
    *) usage >&2; exit 2 ;;
esac
