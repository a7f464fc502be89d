#!/usr/bin/env bash
# The README's test command (`make test`) and CI's: lint, build what the tests need, run pytest
# against the real Kafka broker (started here if none runs, stopped afterwards), real gRPC
# servers, Ray Serve and ONNX models.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
start=$(date +%s)

echo "== lint (ruff)"
$PY -m ruff check services model rlhf tests bench devtools

if [ -f model/build.py ] && [ -z "${COLLOQUY_SKIP_MODEL_BUILD:-}" ]; then
  echo "== model (built once, cached outside the repo)"
  make --no-print-directory model
fi

echo "== cyclonus (offline NetworkPolicy engine for tests/k8s/test_netpol_tool.py; installed once)"
if command -v go >/dev/null 2>&1; then
  bash scripts/k8s-netpol-check.sh --install-only || echo "cyclonus did not install: its tests will skip" >&2
else
  echo "go not found: cyclonus's tests will skip" >&2
fi

echo "== moderation encoder (exported to ONNX once, cached outside the repo)"
make --no-print-directory build-moderation

echo "== kafka"
started_kafka=0
if ! bash scripts/kafka.sh status >/dev/null 2>&1; then
  bash scripts/kafka.sh up
  started_kafka=1
fi
cleanup() { if [ "$started_kafka" = 1 ]; then bash scripts/kafka.sh down || true; fi; }
trap cleanup EXIT

echo "== pytest"
export COLLOQUY_KEEP_KAFKA=1   # this script owns the broker's lifetime
set +e
$PY -m pytest -p no:cacheprovider -ra --durations=25 "$@"
rc=$?
set -e
echo "tests finished in $(( $(date +%s) - start ))s (pytest exit $rc)"
exit $rc
