#!/usr/bin/env bash
# A Docker engine for the container tests.
#
#   docker/engine.sh start   an engine that answers `docker info`: the running one, else a dockerd started here
#                            (installing Debian's docker.io when dockerd is missing). Exit 3 with the reason on
#                            the last line when none can be had.
#   docker/engine.sh stop    stops the dockerd that `start` started, and no other.
#
# The dockerd started here keeps its PID in .cache/docker/dockerd.pid and its log in .cache/docker/dockerd.log;
# its images stay in /var/lib/docker, the cache of the next run.
set -euo pipefail
cd "$(dirname "$0")/.."
STATE=.cache/docker
PIDFILE=$STATE/dockerd.pid
LOG=$STATE/dockerd.log
START_TIMEOUT=${ENGINE_START_TIMEOUT:-60}

unavailable() { echo "$*"; exit 3; }

engine_answers() { command -v docker >/dev/null && timeout 20 docker info >/dev/null 2>&1; }

ours() {  # the PID in $PIDFILE, if that process is still the dockerd started here
    [ -f "$PIDFILE" ] || return 1
    local pid; pid=$(cat "$PIDFILE")
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = dockerd ] || return 1
    grep -q '^State:[[:space:]]*Z' "/proc/$pid/status" && return 1  # exited, not yet reaped
    echo "$pid"
}

start() {
    if engine_answers; then
        echo "engine: running"
        return 0
    fi
    [ "$(id -u)" = 0 ] || unavailable "no Docker engine answers and starting one needs root"
    if ! command -v dockerd >/dev/null; then
        command -v apt-get >/dev/null || unavailable "no Docker engine and no apt-get to install docker.io"
        echo "engine: installing Debian's docker.io ..."
        { timeout 600 apt-get update -qq && DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -qq docker.io
        } >/dev/null 2>&1 \
            || unavailable "apt-get install docker.io failed"
    fi
    if pgrep -x dockerd >/dev/null; then
        unavailable "a dockerd runs but does not answer docker info (not started here, left alone)"
    fi
    mkdir -p "$STATE"
    setsid dockerd >"$LOG" 2>&1 </dev/null &
    echo $! >"$PIDFILE"
    local deadline=$((SECONDS + START_TIMEOUT))
    until engine_answers; do
        if ! ours >/dev/null; then
            rm -f "$PIDFILE"
            unavailable "dockerd exited at start: $(grep -E 'level=(error|fatal)' "$LOG" | tail -1 | cut -c1-300)"
        fi
        if [ $SECONDS -ge $deadline ]; then
            stop >/dev/null
            unavailable "dockerd did not answer within ${START_TIMEOUT}s (log: $LOG)"
        fi
        sleep 0.5
    done
    echo "engine: dockerd started (pid $(cat "$PIDFILE"))"
}

stop() {
    local pid
    if ! pid=$(ours); then
        rm -f "$PIDFILE"
        return 0
    fi
    kill -TERM "$pid"
    for _ in $(seq 60); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.5
    done
    if kill -0 "$pid" 2>/dev/null; then
        echo "engine: dockerd (pid $pid) ignored SIGTERM for 30s, killing it"
        kill -KILL "$pid"
    fi
    rm -f "$PIDFILE"
    echo "engine: dockerd stopped"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
