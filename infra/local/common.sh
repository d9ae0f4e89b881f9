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

# Every descendant of pid $1, found through parent links. It includes processes that left the
# service's process group, such as Ray job drivers, which Ray starts in sessions of their own.
descendants() {
    ps -eo pid=,ppid= | awk -v root="$1" '
        { parent[$1] = $2 }
        END {
            for (p in parent) {
                for (q = parent[p]; q > 1; q = parent[q]) if (q == root) { print p; break }
            }
        }'
}

# Stop the services whose pids are in files $2...: SIGTERM (graceful) to each process group and
# its descendants, all at once, then SIGKILL whatever is left after $1 seconds. Prints the name of
# each pid file whose service was running.
stop_pidfiles() {
    local grace="$1" file pid waited=0
    shift
    local -a pids=() trees=()
    for file in "$@"; do
        pid="$(live_pid "$file")" || continue
        basename "$file" .pid
        trees+=($(descendants "$pid"))
        pids+=("$pid")
        kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    done
    ((${#pids[@]})) || return 0
    for p in "${trees[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    while ((waited < grace * 5)); do
        local left=0
        for pid in "${pids[@]}"; do alive "$pid" && left=1; done
        ((left)) || break
        sleep 0.2
        waited=$((waited + 1))
    done
    for pid in "${pids[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
    for p in "${trees[@]}"; do alive "$p" && kill -KILL "$p" 2>/dev/null || true; done
    rm -f "$@"
    return 0
}

# One service: returns 0 when it was running.
stop_pidfile() {
    [[ -n "$(stop_pidfiles "${2:-20}" "$1")" ]]
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
