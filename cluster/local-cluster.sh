#!/usr/bin/env bash
# A multi-node Ray cluster on this one machine, for trying endor-ray's distributed mode.
#
#   cluster/local-cluster.sh start [N]   a head node for the GPU worker ({"endor_worker": 1}) and
#                                        N nodes for shard servers ({"endor_shard": 1}), default N=2
#   cluster/local-cluster.sh status      ray status of that cluster
#   cluster/local-cluster.sh stop        stop the nodes this script started (and nothing else)
#
# endor_ray.service.driver places shard servers only on nodes with the custom resource "endor_shard"
# (SHARD_RESOURCE) and GPU workers on a node with "endor_worker" (WORKER_RESOURCE), so even on one
# machine layers travel between Ray nodes the way they would between machines.
#
# Each node runs `ray start --block` in the background; its log and the pids are kept in
# $STATE_DIR, and `stop` ends exactly those processes (each takes its node's raylet, workers and
# agents with it). `ray stop` would also do, but it stops every Ray process of this user on the
# machine, other clusters included. Ray's own files go to $STATE_DIR/ray, not the shared /tmp/ray:
# a submitted job's driver is sent to the cluster recorded in TEMP_DIR/ray_current_cluster (the
# last one started there), which in /tmp/ray may be someone else's.
#
# Addresses: the nodes are started with --node-ip-address=127.0.0.1, but for a multi-node cluster
# Ray 2.60 replaces 127.0.0.1 by the machine's own IP, so the GCS, raylets and agents listen on
# the machine's network interface (only the dashboard stays on 127.0.0.1). Clients still use
# 127.0.0.1. (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps a head on loopback, but then
# `ray start --address` refuses to join: it is unset here.)
#
# Token authentication is on by default: `start` uses RAY_AUTH_MODE=token for every node and makes
# a token in ~/.ray/auth_token if there is none (`ray get-auth-token --generate`). Clients on this
# machine need `export RAY_AUTH_MODE=token` (they read the same token file). For a quick local
# trial on a machine nobody else can reach you may `export RAY_AUTH_MODE=disabled` before `start`
# and in the shells that run `endor generate` or `ray job submit`, with ALLOW_UNAUTHENTICATED_CLUSTER=1
# (`start` refuses disabled auth without it: the nodes listen on the network). Real clusters keep token
# authentication on (see cluster/README.md).
#
# Settings (environment): RAY (the ray command; default the repo's .venv/bin/ray, else `ray`),
# PORT (GCS, 6379), DASHBOARD_PORT (8265), CLIENT_PORT (Ray client server, 10001),
# AGENT_PORT (dashboard agent of the head, 52365; shard node k uses AGENT_PORT + k) -- pick ports
# outside Ray's worker port range 10002-19999,
# OBJECT_STORE_MEMORY (bytes per node, default 1 GiB), ALLOW_UNAUTHENTICATED_CLUSTER (1: start with
# RAY_AUTH_MODE=disabled), STATE_DIR (/tmp/endor-cluster-$PORT; keep it
# short: Ray's socket paths under it must stay below 107 bytes).
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
STATE_DIR="${STATE_DIR:-/tmp/endor-cluster-$PORT}"
unset RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER  # at 0, `ray start --address` refuses to join a head

usage() {
    sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'
    echo "Settings: RAY PORT DASHBOARD_PORT CLIENT_PORT AGENT_PORT OBJECT_STORE_MEMORY ALLOW_UNAUTHENTICATED_CLUSTER STATE_DIR (see the script)."
}

# Start one node in the background with --block; remember its pid.
start_node() {
    local name="$1"; shift
    setsid "$RAY" start --block --node-ip-address=127.0.0.1 --disable-usage-stats --temp-dir="$STATE_DIR/ray" \
        --object-store-memory="$OBJECT_STORE_MEMORY" "$@" >"$STATE_DIR/$name.log" 2>&1 < /dev/null &
    echo "$!" >>"$STATE_DIR/pids"
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

alive_nodes() {
    { "$RAY" status --address "127.0.0.1:$PORT" 2>/dev/null || true; } |
        awk '/^Active:/{on=1; next} /^(Pending|Recent failures):/{on=0} on && /node_/{n++} END{print n+0}'
}

# Wait until the cluster has $1 nodes; give up after $2 s or when the node process $3 has exited.
wait_for_nodes() {
    local want="$1" deadline=$((SECONDS + $2)) pid="$3"
    while (( SECONDS < deadline )) && kill -0 "$pid" 2>/dev/null; do
        [[ "$(alive_nodes)" -ge "$want" ]] && return 0
        sleep 1
    done
    return 1
}

wait_for_port() {
    local deadline=$((SECONDS + $2))
    while (( SECONDS < deadline )); do
        port_open "$1" && return 0
        grep -qs "failed to bind" "$STATE_DIR/head.log" && return 1
        sleep 1
    done
    return 1
}

fail() {
    echo "$1; see the logs in $STATE_DIR" >&2
    cmd_stop >/dev/null
    exit 1
}

cmd_start() {
    local num_shard_nodes="${1:-2}"
    [[ "$num_shard_nodes" =~ ^[0-9]+$ ]] || { echo "N must be a number, got '$num_shard_nodes'" >&2; exit 2; }
    if [[ -s "$STATE_DIR/pids" ]]; then
        echo "a cluster from this script seems to run already ($STATE_DIR/pids); run '$0 stop' first" >&2
        exit 1
    fi
    # A multi-node Ray listens on the machine's interface (see Addresses above); without token auth
    # its GCS, raylets, job agent and Serve replicas take code from anyone who reaches them.
    if [[ "${RAY_AUTH_MODE:-token}" == disabled && "${ALLOW_UNAUTHENTICATED_CLUSTER:-0}" != 1 ]]; then
        echo "RAY_AUTH_MODE=disabled: these nodes would listen on this machine's network interface and run code" \
             "for anyone who reaches them (Ray's GCS, raylets, job API); keep token auth (unset RAY_AUTH_MODE) or," \
             "on a network nobody else can reach, set ALLOW_UNAUTHENTICATED_CLUSTER=1" >&2
        exit 1
    fi
    local name port
    for name in PORT DASHBOARD_PORT CLIENT_PORT AGENT_PORT; do
        port="${!name}"
        if port_open "$port"; then
            echo "port $port ($name) is taken (another Ray?); pick another with $name=..." >&2
            exit 1
        fi
    done
    # One auth mode for every node (a joining node does not pick up token mode by itself).
    export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
    if [[ "$RAY_AUTH_MODE" == token && -z "${RAY_AUTH_TOKEN:-}${RAY_AUTH_TOKEN_PATH:-}" ]]; then
        "$RAY" get-auth-token --generate >/dev/null  # ~/.ray/auth_token, made once if missing
    fi
    mkdir -p "$STATE_DIR"
    : >"$STATE_DIR/pids"
    echo "$RAY_AUTH_MODE" >"$STATE_DIR/auth_mode"
    start_node head --head --port="$PORT" --num-cpus=1 --resources='{"endor_worker": 1}' \
        --include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" \
        --ray-client-server-port="$CLIENT_PORT" --dashboard-agent-listen-port="$AGENT_PORT"
    wait_for_nodes 1 90 "$(tail -n 1 "$STATE_DIR/pids")" || fail "the head did not start"
    # `ray job submit` needs the dashboard and the head's job agent: a node can be up without them
    # (e.g. "Agent port #52365 failed to bind"), so wait for both to listen.
    wait_for_port "$DASHBOARD_PORT" 60 || fail "the dashboard did not come up on port $DASHBOARD_PORT"
    wait_for_port "$AGENT_PORT" 60 || fail "the head's job agent did not come up on port $AGENT_PORT (taken?)"
    # One node at a time: nodes starting together on a busy machine can time out registering.
    # Nodes on one machine need their own dashboard-agent port; the other ports are picked free.
    for node_idx in $(seq 1 "$num_shard_nodes"); do
        start_node "shard-$node_idx" --address="127.0.0.1:$PORT" --num-cpus=1 \
            --resources='{"endor_shard": 1}' --dashboard-agent-listen-port=$((AGENT_PORT + node_idx))
        wait_for_nodes $((node_idx + 1)) 90 "$(tail -n 1 "$STATE_DIR/pids")" ||
            fail "shard node $node_idx did not join"
    done
    # A job's entrypoint runs with the PATH of the shell that ran `start`: name the venv's python.
    local bin_dir python=python endor=endor
    bin_dir="$(dirname "$(command -v "$RAY")")"
    [[ -x "$bin_dir/python" ]] && python="$bin_dir/python"
    [[ -x "$bin_dir/endor" ]] && endor="$bin_dir/endor"
    cat <<EOF
Ray at 127.0.0.1:$PORT: a head (endor_worker) + $num_shard_nodes shard nodes (endor_shard). Logs: $STATE_DIR
Token auth: $RAY_AUTH_MODE. Clients need the same: export RAY_AUTH_MODE=$RAY_AUTH_MODE
Try it:
  $endor generate STORE --address 127.0.0.1:$PORT --gpu-memory 0 --prompt "The capital of France is" --max-new-tokens 16
  ray job submit --address http://127.0.0.1:$DASHBOARD_PORT --working-dir . -- \\
      $python -m endor_ray.jobs.generate --store STORE --input prompts.jsonl --output out.parquet
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
        # its process group (setsid) holds that node's raylet, GCS, agents
        kill -0 "$pid" 2>/dev/null && { echo "node $pid did not stop; killing it" >&2; kill -KILL -- "-$pid"; }
    done
    rm -f "$STATE_DIR/pids"
    echo "stopped ${#pids[@]} nodes"
    local left
    left="$(pgrep -f -- "$STATE_DIR/ray" || true)"
    [[ -z "$left" ]] || echo "still running from $STATE_DIR/ray (pids): $left" >&2
}

case "${1:-}" in
    start) shift; cmd_start "$@" ;;
    stop) cmd_stop ;;
    status) RAY_AUTH_MODE="${RAY_AUTH_MODE:-$(cat "$STATE_DIR/auth_mode" 2>/dev/null || echo token)}" \
                "$RAY" status --address "127.0.0.1:$PORT" ;;
    -h|--help|help|"") usage ;;
    *) usage >&2; exit 2 ;;
esac
