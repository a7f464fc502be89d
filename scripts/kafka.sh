#!/usr/bin/env bash
# A real single-node Apache Kafka 4.x broker (KRaft, broker+controller in one
# JVM) for development, tests and CI. No Docker: the jars come from Maven
# Central (deploy/kafka/pom.xml) and the broker runs on the local Java >= 17.
#
#   scripts/kafka.sh fetch     resolve the broker jars into $KAFKA_HOME/libs (once)
#   scripts/kafka.sh up        bootstrap, fetch, format storage (once), start, wait until it answers
#   scripts/kafka.sh down      stop the broker this script started (TERM, then KILL after 30s)
#   scripts/kafka.sh status    say whether it runs; exit 0 if it answers, 3 if not
#   scripts/kafka.sh logs [-f] [N]   last N (100) lines of var/kafka/kafka.log
#   scripts/kafka.sh tool NAME ARGS  run an admin CLI, e.g. `tool TopicCommand --list`
#                                    (org.apache.kafka.tools.NAME; --bootstrap-server is added)
#
# Environment:
#   KAFKA_PORT=9092             client (PLAINTEXT) listener on 127.0.0.1
#   KAFKA_CONTROLLER_PORT=9093  KRaft controller listener on 127.0.0.1
#   COLLOQUY_CACHE=~/.cache/colloquy   jar cache, outside the repo
#   KAFKA_HOME=$COLLOQUY_CACHE/kafka-<version>
#   COLLOQUY_VAR=<repo>/var     runtime state; data in $COLLOQUY_VAR/kafka/data
#   KAFKA_HEAP_OPTS, KAFKA_JVM_OPTS   override the JVM flags below
#   KAFKA_START_TIMEOUT=60      seconds `up` waits for the broker to answer
#   KAFKA_CDS=1                 0 turns off the class-data-sharing archive (see cds_archive)
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
readonly REPO
readonly POM="$REPO/deploy/kafka/pom.xml"
readonly PROPS_TEMPLATE="$REPO/deploy/kafka/server.properties"
readonly LOG4J_CONFIG="$REPO/deploy/kafka/log4j2.yaml"

KAFKA_VERSION=$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$POM")
readonly KAFKA_VERSION
readonly CACHE="${COLLOQUY_CACHE:-$HOME/.cache/colloquy}"
readonly KAFKA_HOME="${KAFKA_HOME:-$CACHE/kafka-$KAFKA_VERSION}"
readonly STAMP="$KAFKA_HOME/.fetched"

readonly KAFKA_HOST=127.0.0.1
readonly KAFKA_PORT="${KAFKA_PORT:-9092}"
readonly KAFKA_CONTROLLER_PORT="${KAFKA_CONTROLLER_PORT:-9093}"
readonly BOOTSTRAP="$KAFKA_HOST:$KAFKA_PORT"

readonly VAR_DIR="${COLLOQUY_VAR:-$REPO/var}"
readonly STATE_DIR="$VAR_DIR/kafka"
readonly DATA_DIR="$STATE_DIR/data"
readonly CLUSTER_ID_FILE="$DATA_DIR/colloquy-cluster-id"
readonly PROPS="$STATE_DIR/server.properties"
readonly PID_FILE="$STATE_DIR/kafka.pid"
readonly LOG_FILE="$STATE_DIR/kafka.log"
readonly LOCK_FILE="$STATE_DIR/kafka.lock"
readonly START_TIMEOUT="${KAFKA_START_TIMEOUT:-60}"
readonly STOP_TIMEOUT=30

# Small heap, Serial GC (no GC threads competing on 2 cores), C1 JIT only
# (-XX:TieredStopAtLevel=1: about half the startup time of full tiered
# compilation here): the broker is a test fixture on a 2-core box, so startup
# time and footprint matter more than peak throughput.
readonly KAFKA_HEAP_OPTS="${KAFKA_HEAP_OPTS:--Xms256m -Xmx512m}"
readonly KAFKA_JVM_OPTS="${KAFKA_JVM_OPTS:--XX:+UseSerialGC -XX:TieredStopAtLevel=1 -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true}"

JAVA=java
if [[ -n "${JAVA_HOME:-}" ]]; then JAVA="$JAVA_HOME/bin/java"; fi
readonly JAVA

# Class-data sharing: the first broker run records the classes it loaded into
# an archive at JVM exit (-XX:ArchiveClassesAtExit, written during `down`);
# later runs map it and start ~40% faster. Keyed by the JVM build; the JVM
# itself ignores an archive that does not match (classpath, JVM), and `fetch`
# deletes them when the jars change.
cds_archive() {
  local tag
  tag=$("$JAVA" -version 2>&1 | sha256sum | cut -c1-12)
  printf '%s\n' "$KAFKA_HOME/cds-$tag.jsa"
}

log() { printf 'kafka: %s\n' "$*"; }
die() { printf 'kafka: error: %s\n' "$*" >&2; exit 1; }

now() { printf '%s\n' "$EPOCHREALTIME"; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

port_open() {
  # The subshell keeps the fd from leaking; timeout bounds a hung connect.
  timeout 2 bash -c "exec 3<>/dev/tcp/$KAFKA_HOST/$1" >/dev/null 2>&1
}

# True when a broker on $KAFKA_PORT answers a Metadata request and lists at
# least one broker: a real request, not just a bound port, and no Python or
# client library needed. Raw Metadata v4 (the oldest version Kafka 4.x still
# serves): api_key 3, version 4, correlation id 2, null client id, null topic
# list (all topics), allow_auto_topic_creation false. The reply starts with
# size, correlation id, throttle_time_ms, broker count. KRaft brokers only
# open the client listener once caught up with the metadata log and unfenced.
broker_answers() {
  # shellcheck disable=SC2016  # expanded by the inner bash, from its "$@"
  timeout 3 bash -c '
    exec 3<>"/dev/tcp/$1/$2" || exit 1
    printf "\x00\x00\x00\x0f\x00\x03\x00\x04\x00\x00\x00\x02\xff\xff\xff\xff\xff\xff\x00" >&3
    reply=$(head -c 16 <&3 | od -An -tx1 | tr -d " \n")
    [[ ${reply:8:8} == 00000002 && ${reply:24:8} != 00000000 && ${reply:24:8} != ffffffff && ${#reply} == 32 ]]
  ' _ "$KAFKA_HOST" "$KAFKA_PORT" >/dev/null 2>&1
}

# PID of the broker this script started, if it still runs.
our_pid() {
  [[ -f "$PID_FILE" ]] || return 1
  local pid
  pid=$(<"$PID_FILE")
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  if kill -0 "$pid" 2>/dev/null && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q 'kafka\.Kafka'; then
    printf '%s\n' "$pid"
    return 0
  fi
  return 1
}

# Serialise up/down between concurrent callers (parallel test workers). The fd
# is closed for the broker itself (9>&- below) so it never holds the lock.
take_lock() {
  mkdir -p "$STATE_DIR"
  exec 9>"$LOCK_FILE"
  flock -w 180 9 || die "timed out waiting for $LOCK_FILE"
}

pom_hash() { sha256sum "$POM" | cut -d' ' -f1; }

cmd_fetch() {
  local want
  want=$(pom_hash)
  if [[ -f "$STAMP" && "$(<"$STAMP")" == "$want" && -d "$KAFKA_HOME/libs" ]]; then
    log "kafka $KAFKA_VERSION already fetched in $KAFKA_HOME"
    return 0
  fi
  command -v mvn >/dev/null 2>&1 || die "mvn missing: run scripts/bootstrap-system.sh"
  log "fetching kafka $KAFKA_VERSION jars from Maven Central into $KAFKA_HOME/libs"
  local t0 tmp
  t0=$(now)
  mkdir -p "$KAFKA_HOME"
  tmp=$(mktemp -d "$KAFKA_HOME/libs.tmp.XXXXXX")
  # shellcheck disable=SC2064  # expand $tmp now
  trap "rm -rf '$tmp'" EXIT
  local out
  if ! out=$(mvn -q -B -Dstyle.color=never -f "$POM" dependency:copy-dependencies \
    -DoutputDirectory="$tmp" -DincludeScope=runtime 2>&1); then
    printf '%s\n' "$out" >&2
    die "maven could not resolve the broker jars (network? Maven Central?)"
  fi
  rm -rf "$KAFKA_HOME/libs"
  rm -f "$KAFKA_HOME"/cds-*.jsa "$KAFKA_HOME"/cds-*.jsa.tmp
  chmod 755 "$tmp"
  mv "$tmp" "$KAFKA_HOME/libs"
  trap - EXIT
  rm -rf "$REPO/deploy/kafka/target"
  printf '%s\n' "$want" >"$STAMP"
  log "fetched $(find "$KAFKA_HOME/libs" -name '*.jar' | wc -l) jars in $(elapsed "$t0")s"
}

render_props() {
  mkdir -p "$DATA_DIR"
  sed -e "s|\${KAFKA_PORT}|$KAFKA_PORT|g" \
      -e "s|\${KAFKA_CONTROLLER_PORT}|$KAFKA_CONTROLLER_PORT|g" \
      -e "s|\${KAFKA_DATA_DIR}|$DATA_DIR|g" \
      "$PROPS_TEMPLATE" >"$PROPS"
}

# A Kafka Uuid: 16 random bytes, URL-safe base64 without padding (22 chars).
# Kafka itself never hands out ids starting with '-' (they read as CLI flags).
new_cluster_id() {
  local id
  while :; do
    id=$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n')
    [[ "$id" == -* ]] || break
  done
  printf '%s\n' "$id"
}

format_storage_once() {
  if [[ -f "$DATA_DIR/meta.properties" ]]; then
    return 0
  fi
  local cid
  if [[ -s "$CLUSTER_ID_FILE" ]]; then
    cid=$(<"$CLUSTER_ID_FILE")
  else
    cid=$(new_cluster_id)
    printf '%s\n' "$cid" >"$CLUSTER_ID_FILE"
  fi
  log "formatting $DATA_DIR (cluster id $cid)"
  # Static quorum (controller.quorum.voters): no --standalone/--initial-controllers.
  "$JAVA" -Xmx256m -XX:TieredStopAtLevel=1 -XX:+UseSerialGC \
    -Dlog4j2.configurationFile="$LOG4J_CONFIG" \
    -cp "$KAFKA_HOME/libs/*" kafka.tools.StorageTool \
    format -t "$cid" -c "$PROPS" >>"$LOG_FILE" 2>&1 \
    || { tail -n 20 "$LOG_FILE" >&2; die "storage format failed"; }
}

rotate_log() {
  if [[ -f "$LOG_FILE" ]] && (( $(stat -c %s "$LOG_FILE") > 50 * 1024 * 1024 )); then
    mv -f "$LOG_FILE" "$LOG_FILE.1"
  fi
}

cmd_up() {
  take_lock
  if broker_answers; then
    log "a broker already answers on $BOOTSTRAP; nothing to do"
    return 0
  fi
  if port_open "$KAFKA_PORT"; then
    die "port $KAFKA_PORT is taken by something that is not an answering Kafka broker"
  fi
  if port_open "$KAFKA_CONTROLLER_PORT"; then
    die "controller port $KAFKA_CONTROLLER_PORT is taken (set KAFKA_CONTROLLER_PORT)"
  fi
  local pid
  if pid=$(our_pid); then
    die "broker pid $pid runs but does not answer on $BOOTSTRAP; see scripts/kafka.sh logs, or scripts/kafka.sh down"
  fi

  "$REPO/scripts/bootstrap-system.sh" --check >/dev/null || "$REPO/scripts/bootstrap-system.sh"
  cmd_fetch
  mkdir -p "$STATE_DIR"
  rotate_log
  render_props
  format_storage_once

  printf '\n===== %s starting kafka %s on %s =====\n' "$(date -Is)" "$KAFKA_VERSION" "$BOOTSTRAP" >>"$LOG_FILE"
  local t0 heap jvm cds=() jsa
  read -r -a heap <<<"$KAFKA_HEAP_OPTS"
  read -r -a jvm <<<"$KAFKA_JVM_OPTS"
  if [[ "${KAFKA_CDS:-1}" == 1 ]]; then
    jsa=$(cds_archive)
    if [[ -s "$jsa" ]]; then
      cds=(-XX:SharedArchiveFile="$jsa")
    else
      rm -f "$jsa.tmp"
      cds=(-XX:ArchiveClassesAtExit="$jsa.tmp")
    fi
    cds+=('-Xlog:cds*=off')
  fi
  t0=$(now)
  # setsid: own session, so the broker outlives the caller's terminal/process
  # group (pytest, CI step). `setsid` execs (no fork) here, so $! is the JVM.
  setsid nohup "$JAVA" "${heap[@]}" "${jvm[@]}" "${cds[@]}" \
    -Dlog4j2.configurationFile="$LOG4J_CONFIG" \
    -Dkafka.logs.dir="$STATE_DIR" \
    -cp "$KAFKA_HOME/libs/*" kafka.Kafka "$PROPS" \
    >>"$LOG_FILE" 2>&1 </dev/null 9>&- &
  pid=$!
  printf '%s\n' "$pid" >"$PID_FILE"
  log "started pid $pid; waiting up to ${START_TIMEOUT}s for $BOOTSTRAP"

  local deadline=$((SECONDS + START_TIMEOUT))
  while :; do
    if ! kill -0 "$pid" 2>/dev/null; then
      rm -f "$PID_FILE"
      tail -n 30 "$LOG_FILE" >&2
      die "broker exited during startup; full log: $LOG_FILE"
    fi
    if broker_answers; then
      break
    fi
    if (( SECONDS >= deadline )); then
      tail -n 30 "$LOG_FILE" >&2
      die "broker did not answer on $BOOTSTRAP within ${START_TIMEOUT}s (pid $pid left running; scripts/kafka.sh down)"
    fi
    sleep 0.2
  done
  log "kafka $KAFKA_VERSION up on $BOOTSTRAP (pid $pid) in $(elapsed "$t0")s"
}

cmd_down() {
  take_lock
  local pid
  if ! pid=$(our_pid); then
    rm -f "$PID_FILE"
    if port_open "$KAFKA_PORT"; then
      log "no broker started by this script; something else listens on $KAFKA_PORT, left alone"
    else
      log "not running"
    fi
    return 0
  fi
  local t0 killed=0
  t0=$(now)
  log "stopping pid $pid (SIGTERM)"
  kill -TERM "$pid" 2>/dev/null || true
  local deadline=$((SECONDS + STOP_TIMEOUT))
  while kill -0 "$pid" 2>/dev/null; do
    if (( SECONDS >= deadline )); then
      log "still running after ${STOP_TIMEOUT}s; SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      killed=1
      break
    fi
    sleep 0.1
  done
  # Reap: the JVM may take a moment to release the ports after SIGKILL.
  while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
  rm -f "$PID_FILE"
  # Keep the class-data archive only from a clean exit (a killed dump is partial).
  local jsa
  jsa=$(cds_archive)
  if [[ -f "$jsa.tmp" ]]; then
    if (( killed == 0 )) && [[ -s "$jsa.tmp" ]]; then mv -f "$jsa.tmp" "$jsa"; else rm -f "$jsa.tmp"; fi
  fi
  log "stopped in $(elapsed "$t0")s"
}

cmd_status() {
  local pid=""
  pid=$(our_pid) || pid=""
  log "version $KAFKA_VERSION, jars $KAFKA_HOME/libs$([[ -f "$STAMP" ]] || echo ' (not fetched)')"
  log "data $DATA_DIR, log $LOG_FILE"
  if broker_answers; then
    log "up on $BOOTSTRAP${pid:+ (pid $pid, started by this script)}"
    return 0
  fi
  if [[ -n "$pid" ]]; then
    log "pid $pid runs but does not answer on $BOOTSTRAP (starting, or stuck)"
  else
    log "down"
  fi
  return 3
}

cmd_logs() {
  local follow=() n=100 arg
  for arg in "$@"; do
    case "$arg" in
      -f) follow=(-F) ;;
      *[!0-9]* | "") die "usage: scripts/kafka.sh logs [-f] [N]" ;;
      *) n=$arg ;;
    esac
  done
  [[ -f "$LOG_FILE" ]] || die "no log yet at $LOG_FILE"
  tail -n "$n" "${follow[@]}" "$LOG_FILE"
}

cmd_tool() {
  [[ $# -ge 1 ]] || die "usage: scripts/kafka.sh tool NAME [ARGS], e.g. tool TopicCommand --list"
  [[ -f "$STAMP" ]] || cmd_fetch >&2
  local name=$1
  shift
  [[ "$name" == *.* ]] || name="org.apache.kafka.tools.$name"
  local extra=()
  case " $* " in
    *" --bootstrap-server "*) ;;
    *) extra=(--bootstrap-server "$BOOTSTRAP") ;;
  esac
  exec "$JAVA" -Xmx256m -XX:TieredStopAtLevel=1 -XX:+UseSerialGC \
    -Dlog4j2.configurationFile="$REPO/deploy/kafka/log4j2-tools.yaml" \
    -cp "$KAFKA_HOME/libs/*" "$name" "${extra[@]}" "$@"
}

usage() {
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'
}

case "${1:-}" in
  fetch) shift; cmd_fetch "$@" ;;
  up) shift; cmd_up "$@" ;;
  down) shift; cmd_down "$@" ;;
  status) shift; cmd_status "$@" ;;
  logs) shift; cmd_logs "$@" ;;
  tool) shift; cmd_tool "$@" ;;
  -h | --help | help) usage ;;
  *) usage >&2; exit 2 ;;
esac
