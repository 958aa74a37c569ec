#!/usr/bin/env bash
# Sets up and runs the secure world as its own principal (needs root):
#   scripts/secure-world.sh start [USER...]   create the accounts, start the service in the background
#   scripts/secure-world.sh stop              stop it (it scrubs and releases its memory first)
#   scripts/secure-world.sh status            is it running, and where
#
# Accounts: the secure world's own system user `flexserve-secure` (it alone
# reads its state directory), and the group `flexserve` whose members may
# talk to it; each USER given is added to that group. Paths (override with
# the environment): FLEXSERVE_STATE_DIR (/var/lib/flexserve-secure),
# FLEXSERVE_SECURE_SOCKET (/run/flexserve/secure.sock), the log beside the socket.
# Binaries come from target/release (build them first) or FLEXSERVE_BIN_DIR;
# they must be owned by root and writable by root alone.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
state_dir="${FLEXSERVE_STATE_DIR:-/var/lib/flexserve-secure}"
socket="${FLEXSERVE_SECURE_SOCKET:-/run/flexserve/secure.sock}"
bin_dir="${FLEXSERVE_BIN_DIR:-$PWD/target/release}"
run_dir="$(dirname "$socket")"
log="$run_dir/secure.log"
pidfile="$run_dir/secure.pid"

need_root() {
  if [ "$(id -u)" != 0 ]; then
    echo "secure-world: $1 needs root (the secure world gets a uid of its own)" >&2
    exit 1
  fi
}

running() {
  [ -s "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null
}

case "${1:-}" in
  start)
    need_root start
    shift
    getent group flexserve >/dev/null || groupadd --system flexserve
    id flexserve-secure >/dev/null 2>&1 ||
      useradd --system --no-create-home --shell /usr/sbin/nologin flexserve-secure
    for user in "$@"; do
      id "$user" >/dev/null 2>&1 || useradd --create-home "$user"
      usermod -a -G flexserve "$user"
    done
    if running; then
      echo "secure-world: already running (pid $(cat "$pidfile"), socket $socket)"
      exit 0
    fi
    mkdir -p "$run_dir"
    "$bin_dir/flexserve-launcher" --state-dir "$state_dir" --socket "$socket" \
      --secure-bin "$bin_dir/flexserve-secure" </dev/null >/dev/null 2>"$log" &
    echo $! >"$pidfile"
    for _ in $(seq 100); do
      grep -q "serving (uid" "$log" 2>/dev/null && break
      running || { cat "$log" >&2; exit 1; }
      sleep 0.1
    done
    grep -q "serving (uid" "$log" || { cat "$log" >&2; exit 1; }
    echo "secure-world: running (pid $(cat "$pidfile"), socket $socket, log $log)"
    ;;
  stop)
    need_root stop
    if running; then
      pid="$(cat "$pidfile")"
      kill -TERM "$pid"
      while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
      tail -n 1 "$log"
    fi
    rm -f "$pidfile"
    ;;
  status)
    if running; then
      echo "running (pid $(cat "$pidfile"), socket $socket, log $log)"
    else
      echo "not running"
      exit 1
    fi
    ;;
  *)
    echo "usage: scripts/secure-world.sh start [USER...] | stop | status" >&2
    exit 2
    ;;
esac
