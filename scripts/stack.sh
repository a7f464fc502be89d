#!/usr/bin/env bash
# Runs Colloquy's services locally as background processes (pid files in var/run, logs in
# var/log). Kafka is managed by scripts/kafka.sh.
#
#   scripts/stack.sh up [service ...]     start (default: all) and wait until each is SERVING
#   scripts/stack.sh down [service ...]   SIGTERM (graceful drain), then SIGKILL after 40 s
#   scripts/stack.sh status
#
# REPLICAS="2" (every service) or REPLICAS="gateway=2 prompt=2": `up` starts that many processes
# of a service, replica k as `<name>-<k>` (the first keeps the plain name) on the service's ports
# + 100 * (k - 1), with its own replica id, pid file and log (devtools/services.py). A service
# named on the command line means all its replicas; `down` stops every replica that runs.
# Generation is one process whatever is asked: its replicas are Ray Serve's, as many as Ray's
# CPUs hold (one on a 2-core machine; `up` prints what was asked and what runs).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=$ROOT/.venv/bin/python
RUN=${COLLOQUY_VAR:-$ROOT/var}/run
LOGS=${COLLOQUY_VAR:-$ROOT/var}/log
mkdir -p "$RUN" "$LOGS"

# process service module port metrics-port probe, one line per process in start order, from the
# one service table (devtools/services.py; TOKENIZER_PORT=..., GATEWAY_PORT=... move a service).
mapfile -t PROCS < <("$PY" -m devtools.services processes)
[ ${#PROCS[@]} -gt 0 ] || { echo "stack: could not read devtools/services.py's table (REPLICAS=${REPLICAS:-})" >&2; exit 1; }

# selected PROCESS SERVICE [name ...]: no names, or one of them is the process or its service.
selected() {
  local proc=$1 svc=$2; shift 2
  [ $# -eq 0 ] && return 0
  for s in "$@"; do [ "$s" = "$proc" ] || [ "$s" = "$svc" ] && return 0; done
  return 1
}

alive() { [ -f "$RUN/$1.pid" ] && kill -0 "$(cat "$RUN/$1.pid")" 2>/dev/null; }

up() {
  # Generation (Ray) first and alone: on 2 cores its raylet gives up waiting for its metrics
  # agent when the other services import their dependencies at the same moment.
  if selected generation generation "$@"; then
    "$PY" -m devtools.services note
    start_and_wait generation
  fi
  SKIP=generation start_and_wait "$@"  # started above
}

start_and_wait() {
  for line in "${PROCS[@]}"; do
    read -r name svc module port mport _ <<<"$line"
    selected "$name" "$svc" "$@" && [ "$svc" != "${SKIP:-}" ] || continue
    if [ ! -d "services/$svc" ]; then echo "stack: $name not built yet, skipped"; continue; fi
    if alive "$name"; then echo "stack: $name already running (pid $(cat "$RUN/$name.pid"))"; continue; fi
    # Its ports, its peers' addresses (GRPC_PORT, METRICS_PORT, MODERATION_ADDR, ...) and, with
    # INSTANCE_ID set, its replica's id (else each derives <hostname>-<port>).
    mapfile -t wiring < <(STACK_RUN_DIR="$RUN" "$PY" -m devtools.services env "$name")
    env "${wiring[@]}" setsid nohup "$PY" -m "$module" >>"$LOGS/$name.log" 2>&1 < /dev/null &
    echo $! > "$RUN/$name.pid"
    echo "stack: started $name (pid $!, port :$port, metrics :$mport, log $LOGS/$name.log)"
  done
  for line in "${PROCS[@]}"; do
    read -r name svc module port mport kind <<<"$line"
    selected "$name" "$svc" "$@" && [ "$svc" != "${SKIP:-}" ] || continue
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

# Every process with a pid file, replicas included (whatever REPLICAS is now), in start order.
running_procs() {
  for line in "${PROCS[@]}"; do
    read -r name svc _ <<<"$line"
    [ "$name" = "$svc" ] || continue
    for f in "$RUN/$svc.pid" "$RUN/$svc"-[0-9]*.pid; do
      if [ -f "$f" ]; then f=${f##*/}; echo "${f%.pid} $svc"; fi
    done
  done
}

down() {
  while read -r name svc; do
    selected "$name" "$svc" "$@" || continue
    if alive "$name"; then
      pid=$(cat "$RUN/$name.pid")
      kill -TERM "$pid" 2>/dev/null || true
      for _ in $(seq 1 80); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
      if kill -0 "$pid" 2>/dev/null; then kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" || true; fi
      echo "stack: stopped $name"
    fi
    rm -f "$RUN/$name.pid"
  done < <(running_procs)
}

status() {
  # Per service in start order: the processes REPLICAS asks for and any other with a pid file.
  declare -A port=()
  for line in "${PROCS[@]}"; do read -r name _ _ p _ <<<"$line"; port[$name]=$p; done
  local running; running=$(running_procs)
  for line in "${PROCS[@]}"; do
    read -r svc s _ <<<"$line"
    [ "$svc" = "$s" ] || continue
    for name in $( { for l in "${PROCS[@]}"; do read -r n s2 _ <<<"$l"; [ "$s2" = "$svc" ] && echo "$n"; done
                    awk -v s="$svc" '$2 == s {print $1}' <<<"$running"; } | sort -uV); do
      if alive "$name"; then echo "$name: running (pid $(cat "$RUN/$name.pid")${port[$name]:+, :${port[$name]}})"
      else echo "$name: down"; fi
    done
  done
}

cmd=${1:-status}; shift || true
case "$cmd" in
  up) up "$@" ;;
  down) down "$@" ;;
  status) status ;;
  *) echo "usage: $0 up|down|status [service ...]" >&2; exit 2 ;;
esac
