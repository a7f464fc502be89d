#!/usr/bin/env bash
# A real local PostgreSQL server (Debian's package) for development and tests of the conversation
# store. One cluster under var/postgres, listening on 127.0.0.1 only, trust authentication: a test
# fixture, never a production database.
#
#   scripts/postgres.sh up       install Debian's postgresql when its binaries are missing, initdb
#                                (once), start, wait until it answers; prints DATABASE_URL
#   scripts/postgres.sh down     stop the cluster (fast shutdown)
#   scripts/postgres.sh status   exit 0 if it answers, 3 if not
#   scripts/postgres.sh url      print the DATABASE_URL of the `postgres` database
#   scripts/postgres.sh logs [N] last N (100) lines of its log
#
# Environment:
#   POSTGRES_PORT=55432          TCP port on 127.0.0.1
#   COLLOQUY_VAR=<repo>/var      runtime state; the cluster lives in $COLLOQUY_VAR/postgres/data
#   POSTGRES_START_TIMEOUT=60    seconds `up` waits for the server to answer
#
# PostgreSQL refuses to run as root: as root the cluster belongs to Debian's `postgres` user and
# every server command runs as that user (runuser). When that user cannot reach var/ (a checkout
# under a private home directory), the cluster lives in /var/tmp/colloquy-postgres-<hash of the
# var path> instead, and var/postgres/cluster-dir says where.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
readonly REPO
readonly PORT="${POSTGRES_PORT:-55432}"
readonly VAR_DIR="${COLLOQUY_VAR:-$REPO/var}"
readonly STATE_DIR="$VAR_DIR/postgres"
readonly LOCK_FILE="$STATE_DIR/postgres.lock"
readonly START_TIMEOUT="${POSTGRES_START_TIMEOUT:-60}"
readonly SUPERUSER=postgres

log() { printf 'postgres.sh: %s\n' "$*" >&2; }

# Where the cluster (data, log, socket) lives: var/postgres, or the fallback recorded by `up`.
RUN_DIR="$STATE_DIR"
if [[ -f "$STATE_DIR/cluster-dir" ]]; then RUN_DIR=$(cat "$STATE_DIR/cluster-dir"); fi
DATA_DIR="$RUN_DIR/data"
LOG_FILE="$RUN_DIR/postgres.log"

# As root: make sure the postgres user can reach RUN_DIR, else move it out of the checkout.
choose_run_dir() {
  [[ $(id -u) -eq 0 ]] || return 0
  id postgres >/dev/null 2>&1 || { log "no 'postgres' user (Debian's package creates it)"; exit 1; }
  mkdir -p "$RUN_DIR"
  chown postgres: "$RUN_DIR"
  if ! runuser -u postgres -- test -w "$RUN_DIR"; then
    RUN_DIR="/var/tmp/colloquy-postgres-$(printf '%s' "$STATE_DIR" | cksum | cut -d' ' -f1)"
    log "the postgres user cannot reach $STATE_DIR; the cluster lives in $RUN_DIR"
    mkdir -p "$RUN_DIR"
    chown postgres: "$RUN_DIR"
    chmod 700 "$RUN_DIR"
    printf '%s\n' "$RUN_DIR" >"$STATE_DIR/cluster-dir"
  fi
  DATA_DIR="$RUN_DIR/data"
  LOG_FILE="$RUN_DIR/postgres.log"
}

# Newest /usr/lib/postgresql/<major>/bin (Debian's layout), or nothing.
pg_bin() {
  local d
  d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
  [[ -n "$d" && -x "$d/initdb" ]] && printf '%s\n' "$d"
}

install_postgres() {
  local sudo=()
  if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null 2>&1 || { log "need root (or sudo) to run: apt-get install -y postgresql"; exit 1; }
    sudo=(sudo)
  fi
  command -v apt-get >/dev/null 2>&1 || { log "no apt-get here; install PostgreSQL (initdb, pg_ctl) by hand"; exit 1; }
  log "installing Debian's postgresql"
  export DEBIAN_FRONTEND=noninteractive
  "${sudo[@]}" apt-get update
  "${sudo[@]}" apt-get install -y --no-install-recommends postgresql
}

ensure_binaries() {
  BIN=$(pg_bin || true)
  if [[ -z "$BIN" ]]; then
    install_postgres
    BIN=$(pg_bin || true)
    [[ -n "$BIN" ]] || { log "postgresql installed but no /usr/lib/postgresql/*/bin/initdb found"; exit 1; }
  fi
}

# Run a server binary as the cluster's owner.
as_owner() {
  if [[ $(id -u) -eq 0 ]]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

answers() {
  local bin
  bin=$(pg_bin || true)
  [[ -n "$bin" ]] || return 1
  "$bin/pg_isready" -q -h 127.0.0.1 -p "$PORT" -U "$SUPERUSER" -d postgres -t 2
}

# Whether something already listens on 127.0.0.1:PORT (bash's /dev/tcp: no extra tool needed).
port_taken() { (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; }

url() { printf 'postgresql+psycopg://%s@127.0.0.1:%s/postgres\n' "$SUPERUSER" "$PORT"; }

init_cluster() {
  mkdir -p "$RUN_DIR"
  choose_run_dir
  if [[ ! -f "$DATA_DIR/PG_VERSION" ]]; then
    log "initdb $DATA_DIR"
    as_owner "$BIN/initdb" -D "$DATA_DIR" -U "$SUPERUSER" -A trust -E UTF8 --locale=C.UTF-8 >/dev/null
    # Test settings: loopback only, small memory, no fsync (a crashed test server is thrown away),
    # dynamic shared memory in files under the data directory rather than /dev/shm (small in
    # containers, and shared there with Ray's object store).
    cat >>"$DATA_DIR/postgresql.conf" <<EOF
# scripts/postgres.sh
listen_addresses = '127.0.0.1'
unix_socket_directories = '$RUN_DIR'
shared_buffers = 32MB
max_connections = 100
fsync = off
synchronous_commit = off
full_page_writes = off
dynamic_shared_memory_type = mmap
EOF
  fi
}

up() {
  if answers; then
    log "already running on 127.0.0.1:$PORT"
    url
    return 0
  fi
  ensure_binaries
  init_cluster
  [[ -f "$LOG_FILE" ]] || { touch "$LOG_FILE"; [[ $(id -u) -ne 0 ]] || chown postgres: "$LOG_FILE"; }
  log "starting on 127.0.0.1:$PORT"
  if port_taken; then
    log "127.0.0.1:$PORT is taken by something that is not an answering PostgreSQL; set POSTGRES_PORT to a free port"
    exit 1
  fi
  # 9>&-: the server must not inherit the lock, or `down` would wait for it forever.
  if ! as_owner "$BIN/pg_ctl" -D "$DATA_DIR" -l "$LOG_FILE" -o "-p $PORT" -w -t "$START_TIMEOUT" start >/dev/null 9>&-; then
    log "pg_ctl could not start the server; the end of $LOG_FILE:"
    tail -n 30 "$LOG_FILE" >&2 || true
    exit 1
  fi
  answers || { log "started but does not answer; the end of $LOG_FILE:"; tail -n 30 "$LOG_FILE" >&2 || true; exit 1; }
  url
}

down() {
  local bin
  bin=$(pg_bin || true)
  if [[ -z "$bin" || ! -f "$DATA_DIR/postmaster.pid" ]]; then
    log "not running"
    return 0
  fi
  BIN=$bin
  as_owner "$BIN/pg_ctl" -D "$DATA_DIR" -m fast -w -t 60 stop >/dev/null
  log "stopped"
}

cmd="${1:-}"
case "$cmd" in
  up|down)
    mkdir -p "$STATE_DIR"
    exec 9>"$LOCK_FILE"
    flock 9
    "$cmd"
    ;;
  status)
    if answers; then echo "postgres: running on 127.0.0.1:$PORT"; else echo "postgres: not running"; exit 3; fi
    ;;
  url) url ;;
  logs) tail -n "${2:-100}" "$LOG_FILE" ;;
  *) echo "usage: $0 up|down|status|url|logs [N]" >&2; exit 2 ;;
esac
