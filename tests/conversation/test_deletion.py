"""Deleting conversations (deletion.Eraser) and the retention sweep, against the real broker and
both real databases: what lands on the topics (tombstones on the conversation's partition, the
feedback erasure) and what is left in the store."""

from __future__ import annotations

import uuid

import pytest
from colloquy.v1 import events_pb2

from services.common import events, kafka_loop, topics
from services.common.config import KafkaConfig
from services.conversation.db import ConversationDB
from services.conversation.deletion import Eraser
from services.conversation.retention import DAY_MS, RetentionSweeper
from tests.common.kafka_util import create, read_to_end
from tests.conversation.records import Feeder, record

pytestmark = pytest.mark.kafka

NOW_MS = 1_800_000_000_000


def test_retention_deletes_idle_conversations_everywhere_and_keeps_active_ones(
        store: ConversationDB, kafka_bootstrap: str, unique: str) -> None:
    turns_topic, feedback_topic = f"t.turns.{unique}", f"t.feedback.{unique}"
    create(kafka_bootstrap, turns_topic, partitions=topics.CONVERSATION_TURNS.partitions)
    create(kafka_bootstrap, feedback_topic)
    idle, active = str(uuid.uuid4()), str(uuid.uuid4())
    Feeder(store).put(record(idle, "alice", 1, created_ms=NOW_MS - 40 * DAY_MS),
                      record(idle, "alice", 2, created_ms=NOW_MS - 31 * DAY_MS),
                      record(active, "alice", 1, created_ms=NOW_MS - 40 * DAY_MS),
                      record(active, "alice", 2, created_ms=NOW_MS - 1 * DAY_MS))
    kafka = KafkaConfig(bootstrap_servers=kafka_bootstrap)
    sweeper = RetentionSweeper(store, lambda: kafka_loop.make_producer(kafka, "retention-test"), days=30,
                               interval_s=3600, turns_topic=turns_topic, feedback_topic=feedback_topic,
                               store_ready=lambda: True, clock=lambda: NOW_MS / 1000)
    try:
        assert sweeper.sweep() == 1
        assert sweeper.sweep() == 0, "a deleted conversation was deleted again"
    finally:
        if sweeper._producer is not None:
            sweeper._producer.close()
    assert store.get_conversation(idle, "alice") is None and store.owner(idle).deleted
    assert [c.conversation_id for c in store.list_conversations("alice").conversations] == [active]
    stones = read_to_end(kafka_bootstrap, turns_topic)
    part = topics.partition_for(idle, topics.CONVERSATION_TURNS.partitions)
    assert sorted((r.key.decode(), r.value, r.partition) for r in stones) == [
        (f"{idle}/1", None, part), (f"{idle}/2", None, part)]
    [erased] = read_to_end(kafka_bootstrap, feedback_topic)
    msg = events.decode(erased.value, erased.headers, events_pb2.ConversationErased)
    assert erased.key.decode() == idle and (msg.conversation_id, msg.user_id, msg.reason) == (idle, "alice",
                                                                                             "retention")


def test_a_failed_send_leaves_the_conversation_in_the_store(store: ConversationDB, kafka_bootstrap: str,
                                                            unique: str) -> None:
    """Kafka first, the store last: when the log cannot take the deletion, nothing is deleted
    and the caller can try again."""
    conv = str(uuid.uuid4())
    Feeder(store).put(record(conv, "alice", 1))
    producer = kafka_loop.make_producer(KafkaConfig(bootstrap_servers=kafka_bootstrap), "deletion-test")
    producer.config["max_block_ms"] = 1000
    try:
        eraser = Eraser(store, producer, turns_topic=f"t.turns.{unique}", feedback_topic=f"t.missing.{unique}")
        with pytest.raises(Exception):  # noqa: B017 - whatever kafka-python raises for a missing topic
            eraser.erase(conv, "alice", "user")
        assert eraser.erase(conv, "mallory", "user") is None, "someone else's conversation was deleted"
    finally:
        producer.close()
    page = store.get_conversation(conv, "alice")
    assert page is not None and len(page.turns) == 1
