"""Prometheus metrics shared by every service, under the `colloquy_` prefix.

Each process exposes the default registry on its own HTTP port (`METRICS_PORT`).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

GRPC_REQUESTS = Counter(
    "colloquy_grpc_requests_total", "gRPC calls handled, by service, method and status code",
    ["service", "method", "code"],
)
GRPC_LATENCY = Histogram(
    "colloquy_grpc_request_duration_seconds", "gRPC call duration (streams: until the last message)",
    ["service", "method"], buckets=LATENCY_BUCKETS,
)
GRPC_IN_FLIGHT = Gauge("colloquy_grpc_in_flight", "gRPC calls being handled", ["service"])

EVENTS_CONSUMED = Counter(
    "colloquy_events_consumed_total", "Kafka records consumed", ["stage", "topic"])
EVENTS_PRODUCED = Counter(
    "colloquy_events_produced_total", "Kafka records produced", ["stage", "topic"])
EVENTS_FAILED = Counter(
    "colloquy_events_failed_total", "Processing attempts that raised (before retry or dead-letter)",
    ["stage", "topic"])
EVENTS_DEAD_LETTERED = Counter(
    "colloquy_events_dead_lettered_total", "Records sent to the dead-letter topic", ["stage", "topic"])
BATCHES_CUT = Counter(
    "colloquy_batches_cut_total", "Batches committed in parts because they ran past KAFKA_BATCH_TIME_BUDGET_MS",
    ["stage"])
EVENTS_DUPLICATE = Counter(
    "colloquy_events_duplicate_total", "Redelivered records skipped by event-id dedupe", ["stage", "topic"])
EVENT_LATENCY = Histogram(
    "colloquy_event_processing_seconds", "Time to process one Kafka record", ["stage", "topic"],
    buckets=LATENCY_BUCKETS)
# Where a transactional stage's time goes (kafka_loop.StageWorker), fine-grained for the pipeline
# benchmark: arrival (per record: the upstream producer's send to this stage's poll: the upstream's
# commit and this consumer's fetch), process (per transaction: the handlers), send (the outputs
# produced and acknowledged), commit (offsets + EndTxn).
STAGE_SECONDS = Histogram(
    "colloquy_stage_seconds", "A transactional stage's time, by part (arrival, process, send, commit)",
    ["stage", "part"],
    buckets=(.0005, .001, .002, .003, .004, .005, .006, .008, .01, .012, .015, .02, .025, .03, .04, .05,
             .075, .1, .15, .2, .3, .5, 1, 2, 5))
STAGE_BATCH_RECORDS = Histogram(
    "colloquy_stage_batch_records", "Records committed in one transaction of a stage", ["stage"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
CONSUMER_LAG = Gauge(
    "colloquy_kafka_consumer_lag", "Records behind the log end, per consumer group and partition",
    ["group", "topic", "partition"])
CONSUMERS_REPLACED = Counter(
    "colloquy_kafka_consumers_replaced_total",
    "Kafka consumers a loop replaced because they stopped reading (kafka_loop.LagProbe), by stage and reason",
    ["stage", "reason"])


def serve_metrics(port: int, host: str = "127.0.0.1") -> int:
    """Start the /metrics HTTP endpoint; returns the bound port (0 picks a free one)."""
    server, _thread = start_http_server(port, addr=host)
    return int(server.server_address[1])
