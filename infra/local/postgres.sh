#!/usr/bin/env bash
# A throwaway PostgreSQL cluster on 127.0.0.1 for the MLflow server's backend store.
#
#   infra/local/postgres.sh start    initdb on first use, start unless running (idempotent), wait until ready
#   infra/local/postgres.sh stop
#   infra/local/postgres.sh status   exit 0 ready, 1 not ready, 3 stopped
#   infra/local/postgres.sh uri      the SQLAlchemy URI, password included, for
#                                    MLFLOW_BACKEND_URI="$(infra/local/postgres.sh uri)" infra/local/mlflow_server.sh start
#
# Everything lives in $INFRA_STATE_DIR/postgres (data dir, log, socket dir, the generated password
# in a 0600 file). The server listens on 127.0.0.1 only, host logins need the password
# (scram-sha-256), and the password is never printed except by `uri`, which exists to hand it over.
# PostgreSQL refuses to run as root: as root the server runs as PG_OS_USER (default postgres).
#
# Environment (defaults): PG_PORT (5432), PG_DB (mlflow), PG_USER (mlflow), PG_BIN (the newest
# /usr/lib/postgresql/*/bin, else pg_ctl on PATH), PG_OS_USER (postgres), INFRA_STATE_DIR (./runs/infra).
SERVICE=postgres
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

PORT="${PG_PORT:-5432}"
DB="${PG_DB:-mlflow}"
DB_USER="${PG_USER:-mlflow}"
# Names go into SQL, a connection URI and command lines: plain identifiers only, checked before
# anything starts. (The SQL below passes them as psql variables as well, never spliced into the text.)
for name in "$DB" "$DB_USER"; do
    [[ "$name" =~ ^[A-Za-z_][A-Za-z0-9_]{0,62}$ ]] ||
        die "PG_DB and PG_USER must be plain identifiers (letters, digits, _; not starting with a digit), got '$name'"
done
[[ "$PORT" =~ ^[0-9]+$ ]] || die "PG_PORT must be a number, got '$PORT'"
PG_STATE="$STATE_DIR/postgres"
DATA="$PG_STATE/data"
SOCKETS="$PG_STATE/run"
LOG="$PG_STATE/server.log"
PASSFILE="$PG_STATE/password"

find_bin() {
    if [[ -n "${PG_BIN:-}" ]]; then
        echo "$PG_BIN"
        return
    fi
    local newest
    newest="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)"
    if [[ -n "$newest" && -x "$newest/pg_ctl" ]]; then
        echo "$newest"
    elif command -v pg_ctl >/dev/null; then
        dirname "$(command -v pg_ctl)"
    fi
}
BIN="$(find_bin)"
[[ -n "$BIN" && -x "$BIN/pg_ctl" ]] || die "PostgreSQL server binaries not found (apt-get install -y postgresql, or set PG_BIN)"

# $1 as one word for /bin/sh: in single quotes, each ' written as '\''.
sh_quote() {
    local q="'\''"
    printf "'%s'" "${1//\'/$q}"
}

# Run a PostgreSQL program as the OS user that owns the data directory.
as_owner() {
    if [[ "$(id -u)" == 0 ]]; then
        runuser -u "${PG_OS_USER:-postgres}" -- "$@"
    else
        "$@"
    fi
}

ready() { "$BIN/pg_isready" -q -h 127.0.0.1 -p "$PORT"; }
running() { [[ -f "$DATA/postmaster.pid" ]] && as_owner "$BIN/pg_ctl" status -D "$DATA" >/dev/null 2>&1; }

init_cluster() {
    [[ -f "$DATA/PG_VERSION" ]] && return 0
    info "initdb in $DATA ($("$BIN/postgres" --version))"
    mkdir -p "$PG_STATE" "$SOCKETS"
    if [[ ! -s "$PASSFILE" ]]; then
        (umask 077 && od -An -N24 -tx1 /dev/urandom | tr -d ' \n' >"$PASSFILE")
    fi
    if [[ "$(id -u)" == 0 ]]; then
        local owner="${PG_OS_USER:-postgres}"
        id "$owner" >/dev/null 2>&1 || die "OS user $owner does not exist; set PG_OS_USER to a non-root user"
        touch "$LOG"
        chown "$owner" "$PG_STATE" "$SOCKETS" "$LOG"
        runuser -u "$owner" -- test -x "$PG_STATE" ||
            die "$owner cannot reach $PG_STATE; choose an INFRA_STATE_DIR that other users can traverse"
    fi
    # initdb reads the superuser's password from a file the server's OS user can read; it is
    # removed right after.
    local pwfile="$PG_STATE/.initdb-pw"
    (umask 077 && cat "$PASSFILE" >"$pwfile")
    [[ "$(id -u)" == 0 ]] && chown "${PG_OS_USER:-postgres}" "$pwfile"
    as_owner "$BIN/initdb" -D "$DATA" -U "$DB_USER" --pwfile="$pwfile" \
        --auth-local=scram-sha-256 --auth-host=scram-sha-256 -E UTF8 --no-instructions >>"$LOG" 2>&1 ||
        {
            rm -f "$pwfile"
            show_log_tail "$LOG"
            die "initdb failed"
        }
    rm -f "$pwfile"
}

cmd_start() {
    if running; then
        local pid
        pid="$(head -n 1 "$DATA/postmaster.pid")"
        wait_healthy "$START_TIMEOUT" "$pid" ready || die "server (pid $pid) runs but is not ready; see $LOG"
        info "already running (pid $pid) on 127.0.0.1:$PORT"
        return 0
    fi
    if port_in_use "$PORT"; then
        die "port $PORT on 127.0.0.1 is already in use by another process; set PG_PORT to a free port"
    fi
    init_cluster
    info "starting on 127.0.0.1:$PORT, data $DATA, log $LOG"
    # pg_ctl hands -o to /bin/sh, so the socket directory (under the state dir, which may contain
    # spaces) is quoted for the shell; PostgreSQL takes the rest of the value as one path.
    if ! as_owner "$BIN/pg_ctl" -D "$DATA" -l "$LOG" -w -t "$START_TIMEOUT" start \
        -o "-c listen_addresses=127.0.0.1 -p $PORT -c unix_socket_directories=$(sh_quote "$SOCKETS")" \
        >/dev/null; then
        show_log_tail "$LOG"
        die "pg_ctl start failed"
    fi
    # The name travels as a psql variable (:'db' is psql's quoted-literal interpolation), which
    # needs the statement on stdin: -c does not interpolate variables.
    if ! PGPASSWORD="$(<"$PASSFILE")" "$BIN/psql" -h 127.0.0.1 -p "$PORT" -U "$DB_USER" -d postgres -tAq \
        -v db="$DB" <<<"SELECT 1 FROM pg_database WHERE datname = :'db'" | grep -q 1; then
        PGPASSWORD="$(<"$PASSFILE")" "$BIN/createdb" -h 127.0.0.1 -p "$PORT" -U "$DB_USER" "$DB" ||
            die "createdb $DB failed"
        info "created database $DB"
    fi
    info "ready; the URI (password included) comes from: $0 uri"
}

cmd_stop() {
    if running; then
        as_owner "$BIN/pg_ctl" -D "$DATA" -m fast -w stop >/dev/null
        info "stopped"
    else
        info "not running"
    fi
}

cmd_status() {
    if ! running; then
        info "stopped"
        exit 3
    fi
    if ready; then
        info "running (pid $(head -n 1 "$DATA/postmaster.pid")) on 127.0.0.1:$PORT, database $DB"
    else
        info "running but not accepting connections on 127.0.0.1:$PORT"
        exit 1
    fi
}

cmd_uri() {
    [[ -s "$PASSFILE" ]] || die "no cluster yet; run $0 start first"
    # The driver is explicit: SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3.
    echo "postgresql+psycopg2://$DB_USER:$(<"$PASSFILE")@127.0.0.1:$PORT/$DB"
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    uri) cmd_uri ;;
    *)
        echo "usage: $0 start | stop | status | uri" >&2
        exit 2
        ;;
esac
