"""Small helpers for tests that talk to the real broker."""

from __future__ import annotations

import time

from google.protobuf.message import Message
from kafka import KafkaConsumer

from services.common import events, kafka_loop, topics
from services.common.config import KafkaConfig


def create(bootstrap: str, *names: str, partitions: int = 3) -> None:
    topics.ensure_topics(bootstrap, [topics.Topic(n, partitions, {}) for n in names])


def produce(bootstrap: str, topic: str, items: list[tuple[str, Message | bytes]]) -> None:
    """Produce protobuf messages (or raw bytes, for poison tests) transactionally-free."""
    producer = kafka_loop.make_producer(KafkaConfig(bootstrap_servers=bootstrap), "test-producer")
    for key, msg in items:
        if isinstance(msg, bytes):
            producer.send(topic, key=key.encode(), value=msg,
                          headers=[("event-type", b"colloquy.v1.TurnEvent")])
        else:
            out = events.OutEvent(topic, key, msg)
            producer.send(topic, key=key.encode(), value=msg.SerializeToString(), headers=out.headers())
    producer.flush()
    producer.close()


def read_all(bootstrap: str, topic: str, expect: int, timeout: float = 60.0,
             settle: float = 2.0) -> list:
    """Read every committed record of `topic` from the start; waits for `expect`, then `settle` more
    seconds to catch duplicates."""
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None,
                             auto_offset_reset="earliest", enable_auto_commit=False,
                             isolation_level="read_committed", fetch_max_wait_ms=50)
    records: list = []
    deadline = time.monotonic() + timeout
    settle_until: float | None = None
    try:
        while time.monotonic() < deadline:
            for recs in consumer.poll(timeout_ms=200).values():
                records.extend(recs)
            if len(records) >= expect and settle_until is None:
                settle_until = time.monotonic() + settle
            if settle_until is not None and time.monotonic() >= settle_until:
                break
    finally:
        consumer.close()
    return records
