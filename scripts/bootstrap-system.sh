#!/usr/bin/env bash
# Make sure the system tools the project runs on exist: Java >= 17 (the Kafka
# 4.x broker needs it) and Maven (fetches the broker's jars from Maven Central).
# Idempotent and fast when everything is present (only `java -version` runs);
# installs the Debian packages otherwise.
#
#   scripts/bootstrap-system.sh            # check, install what is missing
#   scripts/bootstrap-system.sh --check    # check only; exit 1 if something is missing
set -euo pipefail

readonly JAVA_MIN_MAJOR=17
# Debian 12 (bookworm) package names, checked with `apt-cache policy`.
readonly JAVA_PKG=openjdk-17-jre-headless
readonly MAVEN_PKG=maven

check_only=0
case "${1:-}" in
  --check) check_only=1 ;;
  "") ;;
  *) echo "usage: $0 [--check]" >&2; exit 2 ;;
esac

# Same choice as scripts/kafka.sh: $JAVA_HOME/bin/java when JAVA_HOME is set.
JAVA=java
if [[ -n "${JAVA_HOME:-}" ]]; then JAVA="$JAVA_HOME/bin/java"; fi

log() { printf 'bootstrap-system: %s\n' "$*"; }

# Prints the major version of $JAVA (8 for "1.8.0_x", 17 for
# "17.0.15"), or nothing when there is no java.
java_major() {
  command -v "$JAVA" >/dev/null 2>&1 || return 0
  local line ver
  line=$("$JAVA" -version 2>&1 | head -n 1) || return 0
  ver=$(printf '%s\n' "$line" | sed -n 's/.*version "\([^"]*\)".*/\1/p')
  case "$ver" in
    1.*) ver=${ver#1.}; printf '%s\n' "${ver%%.*}" ;;
    *) ver=${ver%%[.+-]*}; printf '%s\n' "$ver" ;;
  esac
}

java_ok() {
  local major
  major=$(java_major)
  [[ -n "$major" && "$major" =~ ^[0-9]+$ && "$major" -ge "$JAVA_MIN_MAJOR" ]]
}

mvn_ok() { command -v mvn >/dev/null 2>&1; }

missing=()
if java_ok; then
  log "java $(java_major) ok ($(command -v "$JAVA"))"
else
  log "java >= $JAVA_MIN_MAJOR missing (found: '$(java_major)')"
  missing+=("$JAVA_PKG")
fi
if mvn_ok; then
  log "maven ok ($(command -v mvn))"
else
  log "maven missing"
  missing+=("$MAVEN_PKG")
fi
# Prometheus + promtool (alert-rule unit tests, the local metrics stack) and the Pushgateway
# the RLHF batch job pushes to: Debian's packages.
if command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; then
  log "prometheus ok ($(command -v prometheus))"
else
  log "prometheus missing"
  missing+=(prometheus prometheus-pushgateway)
fi
# Headless Chromium and its WebDriver: the web page's browser test (tests/pipeline/test_web_page.py).
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
  log "chromium ok ($(command -v chromium))"
else
  log "chromium missing"
  missing+=(chromium chromium-driver)
fi

if [[ ${#missing[@]} -eq 0 ]]; then
  exit 0
fi
if [[ $check_only -eq 1 ]]; then
  log "missing packages: ${missing[*]}"
  exit 1
fi

sudo=()
if [[ $(id -u) -ne 0 ]]; then
  if command -v sudo >/dev/null 2>&1; then
    sudo=(sudo)
  else
    log "need root (or sudo) to run: apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
fi
if ! command -v apt-get >/dev/null 2>&1; then
  log "no apt-get here; install ${missing[*]} (Java >= $JAVA_MIN_MAJOR and Maven) by hand" >&2
  exit 1
fi

log "installing: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update
"${sudo[@]}" apt-get install -y --no-install-recommends "${missing[@]}"

# A java < 17 may still win on PATH after installing 17 (alternatives).
if ! java_ok; then
  j17=$(compgen -G '/usr/lib/jvm/java-1[7-9]*/bin/java' | head -n 1 || true)
  log "java on PATH is still < $JAVA_MIN_MAJOR;${j17:+ set JAVA_HOME=${j17%/bin/java} or run: update-alternatives --set java $j17}" >&2
  exit 1
fi
mvn_ok || { log "maven still missing after install" >&2; exit 1; }
log "done"
