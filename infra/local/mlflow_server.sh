#!/usr/bin/env bash
# An MLflow tracking server with a database backend and a served artifact root, the way a team runs it.
#
#   infra/local/mlflow_server.sh start    start it unless it runs (idempotent), wait for /health
#   infra/local/mlflow_server.sh stop
#   infra/local/mlflow_server.sh status   exit 0 running and healthy, 1 unhealthy, 3 stopped
#   infra/local/mlflow_server.sh uri      the tracking URI clients use (MLFLOW_TRACKING_URI)
#
# Environment (defaults):
#   MLFLOW_HOST (127.0.0.1; set 0.0.0.0 only on purpose, and then also MLFLOW_ALLOWED_HOSTS)
#   MLFLOW_PORT (5000), MLFLOW_WORKERS (1 request worker; this is a small machine)
#   MLFLOW_BACKEND_URI (sqlite:///$INFRA_STATE_DIR/mlflow/mlflow.db; e.g. the PostgreSQL URI that
#     infra/local/postgres.sh uri prints). It reaches the server through the environment, never the
#     command line, so a password in it does not show up in `ps`, and this script never prints it.
#   MLFLOW_ARTIFACTS_DESTINATION ($INFRA_STATE_DIR/mlflow/artifacts; or s3://bucket/prefix): the
#     server proxies artifact uploads and downloads (--serve-artifacts), so clients need no
#     storage credentials and artifact URIs are mlflow-artifacts:/...
#   MLFLOW_SERVER_ENABLE_JOB_EXECUTION (false here: the server's background job runner serves GenAI
#     features training does not use, and costs eight processes)
#   INFRA_STATE_DIR (./runs/infra), INFRA_START_TIMEOUT (180 s)
SERVICE=mlflow
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

MLFLOW="${MLFLOW:-mlflow}"
HOST="${MLFLOW_HOST:-127.0.0.1}"
PORT="${MLFLOW_PORT:-5000}"
WORKERS="${MLFLOW_WORKERS:-1}"
MLFLOW_STATE="$STATE_DIR/mlflow"
mkdir -p "$MLFLOW_STATE"
BACKEND_URI="${MLFLOW_BACKEND_URI:-sqlite:///$MLFLOW_STATE/mlflow.db}"
ARTIFACTS="${MLFLOW_ARTIFACTS_DESTINATION:-$MLFLOW_STATE/artifacts}"
PIDFILE="$MLFLOW_STATE/server.pid"
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
LOG="$MLFLOW_STATE/server.log"

# What a client connects to: loopback when the server listens on every interface.
client_host() { [[ "$HOST" == "0.0.0.0" ]] && echo 127.0.0.1 || echo "$HOST"; }
tracking_uri() { echo "http://$(client_host):$PORT"; }
healthy() { curl -sf -o /dev/null "$(tracking_uri)/health"; }
# scheme://user:<password>@ -> scheme://user:***@, for messages.
redacted() { sed -E 's#(://[^:/@]+):[^@]*@#\1:***@#' <<<"$1"; }

cmd_start() {
    local pid
    if pid="$(live_pid "$PIDFILE")"; then
        wait_healthy "$START_TIMEOUT" "$pid" healthy || die "server (pid $pid) runs but /health fails; see $LOG"
        info "already running (pid $pid) at $(tracking_uri)"
        return 0
    fi
    if port_in_use "$PORT"; then
        die "port $PORT on 127.0.0.1 is already in use by another process; set MLFLOW_PORT to a free port" \
            "(or stop that process)"
    fi
    case "$ARTIFACTS" in
        *://*) ;;
        *) mkdir -p "$ARTIFACTS" ;;
    esac
    : >"$LOG"
    info "starting on $HOST:$PORT, backend $(redacted "$BACKEND_URI"), artifacts $ARTIFACTS, log $LOG"
    local allowed=()
    if [[ -n "${MLFLOW_ALLOWED_HOSTS:-}" ]]; then allowed=(--allowed-hosts "$MLFLOW_ALLOWED_HOSTS"); fi
    MLFLOW_BACKEND_STORE_URI="$BACKEND_URI" spawn "$PIDFILE" "$LOG" "$MLFLOW" server \
        --host "$HOST" --port "$PORT" --workers "$WORKERS" \
        --serve-artifacts --artifacts-destination "$ARTIFACTS" "${allowed[@]}"
    pid="$(cat "$PIDFILE")"
    local rc=0
    wait_healthy "$START_TIMEOUT" "$pid" healthy || rc=$?
    if ((rc)); then
        show_log_tail "$LOG"
        stop_pidfile "$PIDFILE" 5 || true
        ((rc == 2)) && die "the server exited during start-up (see the log above)"
        die "the server did not answer $(tracking_uri)/health within ${START_TIMEOUT}s"
    fi
    redacted "$BACKEND_URI" >"$MLFLOW_STATE/server.backend"
    info "healthy (pid $pid); export MLFLOW_TRACKING_URI=$(tracking_uri)"
}

cmd_stop() {
    if stop_pidfile "$PIDFILE" 15; then
        info "stopped"
    else
        info "not running"
    fi
}

cmd_status() {
    local pid
    if ! pid="$(live_pid "$PIDFILE")"; then
        info "stopped"
        exit 3
    fi
    if healthy; then
        info "running (pid $pid) at $(tracking_uri), backend $(cat "$MLFLOW_STATE/server.backend" 2>/dev/null)"
    else
        info "running (pid $pid) but $(tracking_uri)/health fails"
        exit 1
    fi
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    uri) tracking_uri ;;
    *)
        echo "usage: $0 start | stop | status | uri" >&2
        exit 2
        ;;
esac
