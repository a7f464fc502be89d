"""Prometheus metrics of the web front (served at /metrics on METRICS_PORT, apart from the public port)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

from services.common.metrics import LATENCY_BUCKETS

REQUESTS = Counter("colloquy_web_requests_total", "HTTP requests answered, by route and status",
                   ["route", "status"])
LATENCY = Histogram("colloquy_web_request_duration_seconds",
                    "Time to the response's headers (streams: until streaming starts)", ["route"],
                    buckets=LATENCY_BUCKETS)
TTFT = Histogram("colloquy_web_time_to_first_token_seconds",
                 "Request received to the first answer text sent (streaming chat and responses)", ["route"],
                 buckets=LATENCY_BUCKETS)
DISCONNECTS = Counter("colloquy_web_client_disconnects_total",
                      "Requests whose client went away before the answer ended (the gRPC call is cancelled)",
                      ["route"])
