#!/usr/bin/env bash
# Regenerates the k8s/ files derived from the code (python -m devtools.k8s.sync):
#   the RayService's Serve config per overlay (services/generation/serve_config.yaml + overrides),
#   KafkaTopics (services/common/topics.py), KafkaUsers and their ACLs, the dev API-key copy,
#   the PrometheusRule (deploy/prometheus/*.yml) and the Grafana dashboard ConfigMaps
#   (deploy/grafana/**/*.json).
#
#   scripts/k8s-sync.sh            write what changed
#   scripts/k8s-sync.sh --check    only list stale files; exit 1 if any (tests/k8s does this too)
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m devtools.k8s.sync "$@"
