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
# The web front's own share of a streamed answer's latency, for bench/web.py: "request" from the
# handler receiving the request to issuing the gRPC Chat call (body read, JSON, mapping); "event"
# from a gRPC event read to its server-sent event(s) handed to the server (mapping, JSON, framing).
ADDED = Histogram("colloquy_web_added_seconds",
                  "Time spent in the web front itself, by route and part (request: HTTP request to the gRPC "
                  "call; event: a gRPC event read to its server-sent events written)", ["route", "part"],
                  buckets=(0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1))
