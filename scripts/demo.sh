#!/usr/bin/env bash
# `make demo`: Kafka + the model (built if missing) + every service, then a scripted conversation.
# Leaves the stack running; `make chat` to talk to it, `make down` to stop it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
t0=$SECONDS
make --no-print-directory model build-moderation
bash scripts/kafka.sh up
$PY -c 'from services.common import topics; topics.ensure_topics("'"${KAFKA_BOOTSTRAP_SERVERS:-127.0.0.1:9092}"'")'
bash scripts/stack.sh up
bash scripts/prometheus.sh up   # Prometheus :9090 (deploy/prometheus/prometheus.yml) + Pushgateway :9091
echo "== stack up in $((SECONDS - t0))s; running the scripted conversation"
$PY -m services.gateway.demo
cat <<'MSG'

Colloquy is running.
  make chat                      talk to it in the terminal (colloquy chat)
  http://127.0.0.1:8080/v1       the OpenAI-compatible HTTP API (docs/http-api.md), e.g.
                                 curl -s 127.0.0.1:8080/v1/models -H 'Authorization: Bearer colloquy-dev-key'
  make down                      stop every service and Kafka
  scripts/stack.sh status        what runs; logs in var/log/
  http://127.0.0.1:9090          Prometheus (every service's metrics, alert rules); dashboards to import
                                 into Grafana are in deploy/grafana/ (docs/operations.md)
  http://127.0.0.1:9091          Pushgateway (the RLHF job pushes its training metrics here)
MSG
