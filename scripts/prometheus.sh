#!/usr/bin/env bash
# Prometheus (127.0.0.1:9090, deploy/prometheus/prometheus.yml) and the Pushgateway (127.0.0.1:9091,
# where the RLHF job pushes) for the local stack, from Debian's packages. Pid files in var/run,
# logs in var/log, data in var/prometheus.
#
#   scripts/prometheus.sh up       start both (no-op for one already running); refresh Ray's target
#   scripts/prometheus.sh down     stop both
#   scripts/prometheus.sh status
set -euo pipefail
cd "$(dirname "$0")/.."
VAR=${COLLOQUY_VAR:-$PWD/var}
RUN=$VAR/run LOGS=$VAR/log DATA=$VAR/prometheus
PROM_ADDR=${PROMETHEUS_ADDRESS:-127.0.0.1:9090}
PUSH_ADDR=${PUSHGATEWAY_ADDRESS:-127.0.0.1:9091}
mkdir -p "$RUN" "$LOGS" "$DATA"

alive() { [ -f "$RUN/$1.pid" ] && kill -0 "$(cat "$RUN/$1.pid")" 2>/dev/null; }

start() {  # name, then the command
  local name=$1; shift
  if alive "$name"; then echo "monitoring: $name already running (pid $(cat "$RUN/$name.pid"))"; return; fi
  setsid nohup "$@" >>"$LOGS/$name.log" 2>&1 </dev/null &
  echo $! >"$RUN/$name.pid"
}

wait_ready() {  # name, url
  for _ in $(seq 1 60); do
    if curl -fsS -o /dev/null "$2" 2>/dev/null; then return 0; fi
    alive "$1" || break
    sleep 0.5
  done
  echo "monitoring: $1 did not become ready; last log lines:"; tail -n 20 "$LOGS/$1.log"; return 1
}

ray_targets() {
  # Ray's metrics agent listens on a port Ray picks; its session directory names it. The "ray" job
  # of prometheus.yml reads this file (file_sd), so Prometheus follows a restarted Ray.
  local f port="" targets="[]"
  for f in /tmp/ray/session_latest/metrics_export_port_*; do
    [ -f "$f" ] && port=$(cat "$f")
  done
  if [ -n "$port" ]; then targets="[{\"targets\": [\"127.0.0.1:$port\"]}]"; fi
  echo "$targets" >"$DATA/ray-targets.json.tmp" && mv "$DATA/ray-targets.json.tmp" "$DATA/ray-targets.json"
}

up() {
  for bin in prometheus prometheus-pushgateway; do
    command -v "$bin" >/dev/null || { echo "monitoring: $bin not installed (make setup installs Debian's)"; exit 1; }
  done
  ray_targets
  start pushgateway prometheus-pushgateway --web.listen-address="$PUSH_ADDR" \
    --persistence.file="$DATA/pushgateway.state"
  start prometheus prometheus --config.file=deploy/prometheus/prometheus.yml --storage.tsdb.path="$DATA/data" \
    --storage.tsdb.retention.time=2d --web.listen-address="$PROM_ADDR" --web.enable-lifecycle
  wait_ready pushgateway "http://$PUSH_ADDR/-/ready"
  wait_ready prometheus "http://$PROM_ADDR/-/ready"
  echo "monitoring: Prometheus on http://$PROM_ADDR (targets: http://$PROM_ADDR/targets)," \
       "Pushgateway on http://$PUSH_ADDR"
}

down() {
  for name in prometheus pushgateway; do
    if alive "$name"; then
      pid=$(cat "$RUN/$name.pid")
      kill -TERM "$pid" 2>/dev/null || true
      for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
      kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
      echo "monitoring: stopped $name"
    fi
    rm -f "$RUN/$name.pid"
  done
}

status() {
  for name in prometheus pushgateway; do
    if alive "$name"; then echo "$name: running (pid $(cat "$RUN/$name.pid"))"; else echo "$name: down"; fi
  done
}

cmd=${1:-status}
case "$cmd" in
  up) up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
