"""Small helpers for tests that talk to the real broker."""

from __future__ import annotations

import time

from google.protobuf.message import Message
from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition

from services.common import events, kafka_loop, topics
from services.common.config import KafkaConfig


def create(bootstrap: str, *names: str, partitions: int = 3) -> None:
    topics.ensure_topics(bootstrap, [topics.Topic(n, partitions, {}) for n in names])


def delete_and_wait(admin: KafkaAdminClient, topic: str) -> None:
    """Delete `topic` and wait (up to 30 s) until the broker no longer lists it."""
    admin.delete_topics([topic])
    deadline = time.monotonic() + 30
    while topic in admin.list_topics() and time.monotonic() < deadline:
        time.sleep(0.1)


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


class Tail:
    """The records a topic receives from now on (read_committed), for tests on shared topics.

    Positions are fixed at creation, so `read` sees everything produced after it and nothing from
    before: a check like "no record for this conversation" cannot pass for want of reading far
    enough, and a topic with a day of history does not have to be read from its start.
    """

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.bootstrap = bootstrap
        self.consumer = self._new_consumer()
        self.parts = [TopicPartition(topic, p) for p in sorted(self.consumer.partitions_for_topic(topic) or ())]
        self.consumer.assign(self.parts)
        self.consumer.seek_to_end(*self.parts)
        # resolved now, before the test produces anything
        self.start = {tp: self.consumer.position(tp) for tp in self.parts}
        self.records: list = []

    def _new_consumer(self) -> KafkaConsumer:
        return KafkaConsumer(bootstrap_servers=self.bootstrap, group_id=None, enable_auto_commit=False,
                             isolation_level="read_committed", fetch_max_wait_ms=50)

    def rescan(self) -> None:
        """Read again from the positions taken at creation, with a fresh consumer: kafka-python
        3.0.12 can lose a fetch under CPU contention (records waiting, no FetchRequest sent again;
        services/generation/worker.py probes for it), after which poll returns nothing for good."""
        self.consumer.close()
        self.consumer = self._new_consumer()
        self.consumer.assign(self.parts)
        for tp, offset in self.start.items():
            self.consumer.seek(tp, offset)
        self.records = []

    def read(self, settle: float = 1.0, timeout: float = 60.0) -> list:
        """Everything committed up to the topic's end as of this call, then `settle` seconds more."""
        ends = self.consumer.end_offsets(self.parts)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for recs in self.consumer.poll(timeout_ms=200).values():
                self.records.extend(recs)
            if all(self.consumer.position(tp) >= ends[tp] for tp in self.parts):
                break
        else:
            raise TimeoutError(f"did not reach the end of {self.parts[0].topic} in {timeout}s")
        until = time.monotonic() + settle
        while time.monotonic() < until:
            for recs in self.consumer.poll(timeout_ms=100).values():
                self.records.extend(recs)
        return self.records

    def close(self) -> None:
        self.consumer.close()


def read_to_end(bootstrap: str, topic: str, partitions: list[int] | None = None, timeout: float = 30.0) -> list:
    """Every record of `topic` (tombstones included; all partitions or those named) from the
    beginning to the end offsets taken now."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    try:
        parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())
                 if partitions is None or p in partitions]
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        ends = consumer.end_offsets(parts)
        out: list = []
        deadline = time.monotonic() + timeout
        while any(consumer.position(tp) < end for tp, end in ends.items()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"could not read {topic} to its end")
            for recs in consumer.poll(timeout_ms=200).values():
                out.extend(recs)
        return out
    finally:
        consumer.close()
