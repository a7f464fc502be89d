#!/usr/bin/env bash
# `make down`: stop Prometheus and the Pushgateway, every local service, then the Kafka broker.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/prometheus.sh down
bash scripts/stack.sh down
bash scripts/kafka.sh down
