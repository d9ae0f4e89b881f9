# Shared helpers for the infra/local/ service scripts (sourced, not executed).
#
# Every service keeps its pid file, log and data under one state directory (INFRA_STATE_DIR,
# default ./runs/infra, which .gitignore already excludes) and is started in its own session
# (setsid), so "stop" can end exactly the processes it started: the pid recorded at start is
# also the process-group id of everything that service spawned. Nothing here kills by name.

set -euo pipefail

STATE_DIR="${INFRA_STATE_DIR:-./runs/infra}"
mkdir -p "$STATE_DIR"
STATE_DIR="$(cd "$STATE_DIR" && pwd)"
START_TIMEOUT="${INFRA_START_TIMEOUT:-180}"

info() { echo "[$SERVICE] $*"; }
die() {
    echo "[$SERVICE] error: $*" >&2
    exit 1
}

# True when something accepts TCP connections on 127.0.0.1:$1 (bash's /dev/tcp, no extra tools).
port_in_use() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# True when process $1 exists and is not a zombie (a killed process stays visible to `kill -0`
# until whoever inherited it reaps it).
alive() {
    local stat
    stat="$(ps -o stat= -p "$1" 2>/dev/null)" || return 1
    [[ -n "$stat" && "$stat" != Z* ]]
}

# The pid in pid file $1 when that process is alive, else nothing (and a stale file is removed).
live_pid() {
    local file="$1" pid
    [[ -f "$file" ]] || return 1
    pid="$(cat "$file")"
    if [[ -n "$pid" ]] && alive "$pid"; then
        echo "$pid"
        return 0
    fi
    rm -f "$file"
    return 1
}

# Run "$@" in a new session in the background, output to log $1... usage: spawn PIDFILE LOG CMD...
# In a non-interactive shell the background child is not a group leader, so setsid does not fork
# and $! is the service's own pid, which is also its process-group id.
spawn() {
    local pidfile="$1" log="$2"
    shift 2
    setsid "$@" >>"$log" 2>&1 </dev/null &
    echo "$!" >"$pidfile"
}

# Stop the service whose pid is in $1: SIGTERM (graceful), then SIGKILL its whole process group
# after $2 seconds. Returns 0 when it was running.
stop_pidfile() {
    local file="$1" grace="${2:-20}" pid waited=0
    pid="$(live_pid "$file")" || return 1
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    while alive "$pid" && ((waited < grace * 5)); do
        sleep 0.2
        waited=$((waited + 1))
    done
    # Children that outlive the leader (or a leader that ignored SIGTERM) go with the group.
    kill -KILL -- "-$pid" 2>/dev/null || true
    rm -f "$file"
    return 0
}

# Poll "$@" until it succeeds; give up after $1 seconds or when pid $2 exits. usage: wait_healthy SECS PID CMD...
wait_healthy() {
    local secs="$1" pid="$2" start=$SECONDS
    shift 2
    until "$@" >/dev/null 2>&1; do
        if ! alive "$pid"; then
            return 2
        fi
        if ((SECONDS - start >= secs)); then
            return 1
        fi
        sleep 1
    done
}

show_log_tail() {
    echo "----- last lines of $1 -----" >&2
    tail -n "${2:-25}" "$1" >&2 || true
}
