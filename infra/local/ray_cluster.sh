#!/usr/bin/env bash
# A multi-node Ray cluster on one machine: one head plus N worker nodes, each a separate
# `ray start --block` with its own resources, started the way operators start nodes by hand.
#
#   infra/local/ray_cluster.sh start [--workers N]   start what is missing (idempotent), wait until healthy
#   infra/local/ray_cluster.sh stop                  stop the workers, then the head
#   infra/local/ray_cluster.sh status                pids, health and `ray status`; exit 0 only when healthy
#   infra/local/ray_cluster.sh env                   the exports a client needs: eval "$(... env)"
#   infra/local/ray_cluster.sh kill-worker I         SIGKILL worker node I and everything it spawned
#                                                    (a lost machine, for failure drills)
#
# Layout: the head offers RAY_HEAD_CPUS (default 0: it runs job drivers and Ray Train's controller,
# which need no CPU, and no training worker); worker node I offers RAY_WORKER_CPUS CPUs,
# RAY_WORKER_GPUS GPUs and one unit of the custom resource "worker_node_I", so a job can pin work
# to a node. With cpus_per_worker == RAY_WORKER_CPUS each training worker fills one node.
#
# Environment (defaults): RAY_HEAD_PORT (6379), RAY_DASHBOARD_PORT (8265, the job-submission API),
# RAY_CLIENT_PORT (10001), RAY_WORKERS (2), RAY_HEAD_CPUS (0), RAY_WORKER_CPUS (2),
# RAY_WORKER_GPUS (0), RAY_OBJECT_STORE_BYTES (200000000 per node), RAY_AUTH_MODE (token; or
# disabled), INFRA_STATE_DIR (./runs/infra: pid files, logs, the auth token), RAY_TEMP_ROOT
# (/tmp/ray-infra-$UID-$RAY_HEAD_PORT: Ray's session dirs; short because Ray puts unix sockets there),
# INFRA_START_TIMEOUT (180 s), RAY_NODE_START_ATTEMPTS (3).
#
# Ray binds its own services (GCS, raylets, object managers) to the machine's address, not only to
# loopback: `--node-ip-address=127.0.0.1` is rewritten by Ray itself. The dashboard / job API binds
# 127.0.0.1, and token authentication is on by default, so nothing is reachable without the token.
SERVICE=ray
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

RAY="${RAY:-ray}"
HEAD_PORT="${RAY_HEAD_PORT:-6379}"
DASHBOARD_PORT="${RAY_DASHBOARD_PORT:-8265}"
CLIENT_PORT="${RAY_CLIENT_PORT:-10001}"
WORKERS="${RAY_WORKERS:-2}"
HEAD_CPUS="${RAY_HEAD_CPUS:-0}"
WORKER_CPUS="${RAY_WORKER_CPUS:-2}"
WORKER_GPUS="${RAY_WORKER_GPUS:-0}"
OBJECT_STORE_BYTES="${RAY_OBJECT_STORE_BYTES:-200000000}"
TEMP_ROOT="${RAY_TEMP_ROOT:-/tmp/ray-infra-$(id -u)-$HEAD_PORT}"
RAY_STATE="$STATE_DIR/ray"
mkdir -p "$RAY_STATE"

# Token authentication: one token per state dir, shared by every node and every client.
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
if [[ "$RAY_AUTH_MODE" == "token" ]]; then
    export RAY_AUTH_TOKEN_PATH="${RAY_AUTH_TOKEN_PATH:-$RAY_STATE/auth_token}"
    if [[ ! -s "$RAY_AUTH_TOKEN_PATH" ]]; then
        (umask 077 && od -An -N32 -tx1 /dev/urandom | tr -d ' \n' >"$RAY_AUTH_TOKEN_PATH")
    fi
fi
# Keep `ray` from phoning home and from finding some other cluster through /tmp/ray.
export RAY_USAGE_STATS_ENABLED=0
unset RAY_ADDRESS

gcs_address() { echo "127.0.0.1:$HEAD_PORT"; }
head_pidfile() { echo "$RAY_STATE/head.pid"; }
worker_pidfile() { echo "$RAY_STATE/worker-$1.pid"; }

cluster_status() { "$RAY" status --address "$(gcs_address)"; }
node_registered() { cluster_status 2>/dev/null | grep -q "worker_node_$1\b"; }
# The job API answers only with the token; the header comes from a builtin printf through a pipe,
# so the token never shows up in a process listing.
dashboard_up() {
    local url="http://127.0.0.1:$DASHBOARD_PORT/api/version"
    if [[ "$RAY_AUTH_MODE" == "token" ]]; then
        curl -sf -o /dev/null -H @<(printf 'Authorization: Bearer %s\n' "$(<"$RAY_AUTH_TOKEN_PATH")") "$url"
    else
        curl -sf -o /dev/null "$url"
    fi
}

start_head() {
    local pid
    if pid="$(live_pid "$(head_pidfile)")"; then
        # Ours (the pid file says so): make sure it is also healthy, e.g. after a concurrent start.
        wait_healthy "$START_TIMEOUT" "$pid" dashboard_up || die "head (pid $pid) runs but is not healthy"
        info "head already running (pid $pid, GCS $(gcs_address))"
        return 0
    fi
    for port in "$HEAD_PORT" "$DASHBOARD_PORT" "$CLIENT_PORT"; do
        if port_in_use "$port"; then
            die "port $port on 127.0.0.1 is already in use by another process; choose another with" \
                "RAY_HEAD_PORT / RAY_DASHBOARD_PORT / RAY_CLIENT_PORT (or stop that process)"
        fi
    done
    local attempt rc log="$RAY_STATE/head.log"
    for ((attempt = 1; attempt <= ${RAY_NODE_START_ATTEMPTS:-3}; attempt++)); do
        spawn_head
        pid="$(cat "$(head_pidfile)")"
        rc=0
        wait_healthy "$START_TIMEOUT" "$pid" cluster_status || rc=$?
        ((rc == 2)) || break
        kill -KILL -- "-$pid" 2>/dev/null || true # what the failed start left behind
        show_log_tail "$log" 5
        info "the head exited during start-up (attempt $attempt); starting it again"
    done
    if ((rc)); then
        show_log_tail "$log"
        die "the head did not become healthy (see $log)"
    fi
    if ! wait_healthy "$START_TIMEOUT" "$pid" dashboard_up; then
        show_log_tail "$log"
        die "the job API on port $DASHBOARD_PORT did not come up within ${START_TIMEOUT}s"
    fi
    info "head healthy (pid $pid)"
}

spawn_head() {
    mkdir -p "$TEMP_ROOT/head"
    local log="$RAY_STATE/head.log"
    info "starting head: GCS $(gcs_address), job API http://127.0.0.1:$DASHBOARD_PORT, log $log"
    spawn "$(head_pidfile)" "$log" "$RAY" start --head --block \
        --node-ip-address=127.0.0.1 --port="$HEAD_PORT" \
        --num-cpus="$HEAD_CPUS" --num-gpus=0 \
        --include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" \
        --dashboard-agent-listen-port=0 --ray-client-server-port="$CLIENT_PORT" \
        --object-store-memory="$OBJECT_STORE_BYTES" --temp-dir="$TEMP_ROOT/head" \
        --disable-usage-stats
}

start_worker() {
    local i="$1" pid
    if pid="$(live_pid "$(worker_pidfile "$i")")"; then
        info "worker node $i already running (pid $pid)"
        return 0
    fi
    mkdir -p "$TEMP_ROOT/w$i"
    local log="$RAY_STATE/worker-$i.log"
    info "starting worker node $i: $WORKER_CPUS CPUs, $WORKER_GPUS GPUs, resource worker_node_$i, log $log"
    spawn "$(worker_pidfile "$i")" "$log" "$RAY" start --block --address="$(gcs_address)" \
        --node-ip-address=127.0.0.1 \
        --num-cpus="$WORKER_CPUS" --num-gpus="$WORKER_GPUS" --resources="{\"worker_node_$i\": 1}" \
        --dashboard-agent-listen-port=0 --object-store-memory="$OBJECT_STORE_BYTES" \
        --temp-dir="$TEMP_ROOT/w$i" --disable-usage-stats
}

# Ray gives a starting node a fixed 30 s to register with the GCS; on a loaded machine that can
# pass, and `ray start` then exits. Such a node is started again, up to RAY_NODE_START_ATTEMPTS times.
ensure_worker() {
    local i="$1" pid rc attempt log="$RAY_STATE/worker-$1.log"
    for ((attempt = 1; attempt <= ${RAY_NODE_START_ATTEMPTS:-3}; attempt++)); do
        start_worker "$i"
        pid="$(cat "$(worker_pidfile "$i")")"
        rc=0
        wait_healthy "$START_TIMEOUT" "$pid" node_registered "$i" || rc=$?
        if ((rc == 0)); then
            info "worker node $i healthy (pid $pid)"
            return 0
        fi
        show_log_tail "$log" 5
        ((rc == 2)) || die "worker node $i did not join the cluster within ${START_TIMEOUT}s"
        kill -KILL -- "-$pid" 2>/dev/null || true # what the failed start left behind
        info "worker node $i exited during start-up (attempt $attempt); starting it again"
    done
    die "worker node $i failed to start ${RAY_NODE_START_ATTEMPTS:-3} times; see $log"
}

cmd_start() {
    echo "$WORKERS" >"$RAY_STATE/workers"
    start_head
    # One node at a time: starting them together makes each slower on a small machine.
    for ((i = 1; i <= WORKERS; i++)); do ensure_worker "$i"; done
    info "cluster up: 1 head + $WORKERS worker nodes; submit with:"
    info "  eval \"\$($0 env)\" && ray job submit --working-dir . -- python -m pipeline.train ..."
}

cmd_stop() {
    local stopped
    # Every node at once: stopping them one by one only adds up their shutdown times.
    stopped="$(stop_pidfiles 20 "$RAY_STATE"/worker-*.pid "$(head_pidfile)")"
    for name in $stopped; do info "stopped $name"; done
    # Ray's session dirs (logs of every Ray process) go with the cluster; our own logs stay.
    rm -rf "$TEMP_ROOT" "$RAY_STATE/workers"
    [[ -n "$stopped" ]] || info "not running"
}

cmd_status() {
    local pid healthy=1 running=0
    if pid="$(live_pid "$(head_pidfile)")"; then
        info "head: running (pid $pid, GCS $(gcs_address), job API http://127.0.0.1:$DASHBOARD_PORT)"
        running=1
    else
        info "head: stopped"
        healthy=0
    fi
    # The nodes the last start was asked for: one missing is a degraded cluster, not a smaller one.
    local expected=0
    [[ -f "$RAY_STATE/workers" ]] && expected="$(<"$RAY_STATE/workers")"
    for ((i = 1; i <= expected; i++)); do
        if pid="$(live_pid "$(worker_pidfile "$i")")"; then
            info "worker-$i: running (pid $pid)"
            running=1
        else
            info "worker-$i: stopped"
            healthy=0
        fi
    done
    if ((running)) && cluster_status; then
        :
    elif ((running)); then
        info "ray status failed: the cluster is not healthy"
        healthy=0
    fi
    if ((!running)); then exit 3; fi
    ((healthy)) || exit 1
}

cmd_env() {
    echo "export RAY_API_SERVER_ADDRESS=http://127.0.0.1:$DASHBOARD_PORT"
    echo "export RAY_AUTH_MODE=$RAY_AUTH_MODE"
    if [[ "$RAY_AUTH_MODE" == "token" ]]; then
        echo "export RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH"
    fi
}

cmd_kill_worker() {
    local i="${1:-}" pid
    [[ "$i" =~ ^[0-9]+$ ]] || die "usage: $0 kill-worker I"
    pid="$(live_pid "$(worker_pidfile "$i")")" || die "worker node $i is not running"
    kill -KILL -- "-$pid"
    for _ in {1..50}; do alive "$pid" || break; sleep 0.1; done
    info "killed worker node $i (process group $pid)"
}

command="${1:-}"
shift || true
while (($#)); do
    case "$1" in
        --workers)
            WORKERS="${2:?--workers needs a number}"
            shift 2
            ;;
        --workers=*)
            WORKERS="${1#*=}"
            shift
            ;;
        *)
            [[ "$command" == "kill-worker" ]] && break
            die "unknown argument $1"
            ;;
    esac
done
[[ "$WORKERS" =~ ^[0-9]+$ ]] || die "--workers: expected a number, got $WORKERS"

case "$command" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) cmd_env ;;
    kill-worker) cmd_kill_worker "$@" ;;
    *)
        echo "usage: $0 start [--workers N] | stop | status | env | kill-worker I" >&2
        exit 2
        ;;
esac
