#!/usr/bin/env bash
# Second check of the Kubernetes NetworkPolicies with cyclonus, an offline policy engine
# (devtools/k8s/netpol_tool.py): every address a container dials must be allowed at both ends, and
# cyclonus must agree with devtools/k8s/connectivity.py on every flow it is asked about.
#
#   scripts/k8s-netpol-check.sh    install cyclonus (pinned, Go module proxy) into .venv/bin if
#                                  missing, then judge both overlays; exit 1 on any disagreement
#   scripts/k8s-netpol-check.sh --install-only    only the install (make test runs this)
#
# Needs Go (1.21+) for the install; tests/k8s/test_netpol_tool.py then runs instead of skipping.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=v0.5.6
if [[ ! -x .venv/bin/cyclonus && -z "${CYCLONUS:-}" ]]; then
  command -v go >/dev/null || { echo "go not found: needed to install cyclonus" >&2; exit 2; }
  GOBIN="$PWD/.venv/bin" GOFLAGS=-buildvcs=false go install "github.com/mattfenwick/cyclonus/cmd/cyclonus@${VERSION}"
fi
[[ "${1:-}" == --install-only ]] && exit 0
exec .venv/bin/python -m devtools.k8s.netpol_tool
