"""The materializer's Prometheus metrics (lag is the shared colloquy_kafka_consumer_lag)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from services.common.metrics import LATENCY_BUCKETS

STORE_CHANGES = Counter(
    "colloquy_conversation_store_changes_total",
    "Records applied to the conversation store, by outcome: written (a turn inserted or replaced), "
    "deleted_turn / deleted_conversation / tombstone_noop (tombstones), ignored_other_owner, ignored_deleted, "
    "late_tombstoned (a turn of a deleted conversation, given a tombstone on the topic)",
    ["outcome"])
BATCH_SECONDS = Histogram(
    "colloquy_conversation_batch_seconds", "One batch's database transaction (rows and offsets), until commit",
    buckets=LATENCY_BUCKETS)
OFFSETS_MOVED = Counter(
    "colloquy_conversation_offsets_moved_total",
    "Batches rolled back because another writer had moved the stored offsets (re-read from the database)")
DB_ERRORS = Counter(
    "colloquy_conversation_db_errors_total", "Database operations that failed (the batch is redone)")
READY = Gauge(
    "colloquy_conversation_store_ready",
    "1 once the store is migrated, reachable and caught up with the topic's end offsets seen at start")
