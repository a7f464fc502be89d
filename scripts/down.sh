#!/usr/bin/env bash
# `make down`: stop every local service, then the Kafka broker.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/stack.sh down
bash scripts/kafka.sh down
