#!/usr/bin/env bash
# Runs Colloquy's services locally as background processes (pid files in var/run, logs in
# var/log). Kafka is managed by scripts/kafka.sh.
#
#   scripts/stack.sh up [service ...]     start (default: all) and wait until each is SERVING
#   scripts/stack.sh down [service ...]   SIGTERM (graceful drain), then SIGKILL after 40 s
#   scripts/stack.sh status
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=$ROOT/.venv/bin/python
RUN=${COLLOQUY_VAR:-$ROOT/var}/run
LOGS=${COLLOQUY_VAR:-$ROOT/var}/log
mkdir -p "$RUN" "$LOGS"

# name module port metrics-port probe, one line per service in start order, from the one service
# table (devtools/services.py; TOKENIZER_PORT=..., GATEWAY_PORT=... move a service).
mapfile -t SERVICES < <("$PY" -m devtools.services table)
[ ${#SERVICES[@]} -gt 0 ] || { echo "stack: could not read devtools/services.py's table" >&2; exit 1; }

selected() {
  local name=$1; shift
  [ $# -eq 0 ] && return 0
  for s in "$@"; do [ "$s" = "$name" ] && return 0; done
  return 1
}

alive() { [ -f "$RUN/$1.pid" ] && kill -0 "$(cat "$RUN/$1.pid")" 2>/dev/null; }

up() {
  # Generation (Ray) first and alone: on 2 cores its raylet gives up waiting for its metrics
  # agent when the other services import their dependencies at the same moment.
  if selected generation "$@"; then start_and_wait generation; fi
  start_and_wait "$@"
}

start_and_wait() {
  for line in "${SERVICES[@]}"; do
    read -r name module port mport _ <<<"$line"
    selected "$name" "$@" || continue
    if [ ! -d "services/$name" ]; then echo "stack: $name not built yet, skipped"; continue; fi
    if alive "$name"; then echo "stack: $name already running (pid $(cat "$RUN/$name.pid"))"; continue; fi
    # Its ports and its peers' addresses (GRPC_PORT, METRICS_PORT, MODERATION_ADDR, ...).
    mapfile -t wiring < <("$PY" -m devtools.services env "$name")
    env INSTANCE_ID="${INSTANCE_ID:-local}" "${wiring[@]}" \
      setsid nohup "$PY" -m "$module" >>"$LOGS/$name.log" 2>&1 < /dev/null &
    echo $! > "$RUN/$name.pid"
    echo "stack: started $name (pid $!, port :$port, metrics :$mport, log $LOGS/$name.log)"
  done
  for line in "${SERVICES[@]}"; do
    read -r name module port mport kind <<<"$line"
    selected "$name" "$@" || continue
    [ -f "$RUN/$name.pid" ] || continue
    local t0=$SECONDS
    if [ "$kind" = http ]; then probe=(-m services.web.probe "http://127.0.0.1:$port/readyz")
    else probe=(-m services.common.health_probe "127.0.0.1:$port"); fi
    if ! "$PY" "${probe[@]}" --wait "${STACK_START_TIMEOUT:-300}"; then
      echo "stack: $name did not become healthy; last log lines:"; tail -n 30 "$LOGS/$name.log"; exit 1
    fi
    echo "stack: $name serving on :$port ($((SECONDS - t0))s)"
  done
}

down() {
  for line in "${SERVICES[@]}"; do
    read -r name _ <<<"$line"
    selected "$name" "$@" || continue
    if alive "$name"; then
      pid=$(cat "$RUN/$name.pid")
      kill -TERM "$pid" 2>/dev/null || true
      for _ in $(seq 1 80); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
      if kill -0 "$pid" 2>/dev/null; then kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" || true; fi
      echo "stack: stopped $name"
    fi
    rm -f "$RUN/$name.pid"
  done
}

status() {
  for line in "${SERVICES[@]}"; do
    read -r name _ port _ <<<"$line"
    if alive "$name"; then echo "$name: running (pid $(cat "$RUN/$name.pid"), :$port)"; else echo "$name: down"; fi
  done
}

cmd=${1:-status}; shift || true
case "$cmd" in
  up) up "$@" ;;
  down) down "$@" ;;
  status) status ;;
  *) echo "usage: $0 up|down|status [service ...]" >&2; exit 2 ;;
esac
