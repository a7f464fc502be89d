"""The topic table (services/common/topics.py): rules that hold between its entries."""

from __future__ import annotations

import time

import pytest

from services.common import topics


def retention_ms(topic: topics.Topic) -> float:
    """How long the topic keeps a record (compacted topics keep the latest per key for good)."""
    if "delete" not in topic.configs.get("cleanup.policy", "delete"):
        return float("inf")
    return int(topic.configs["retention.ms"])


def test_dead_letter_topic_keeps_user_text_no_longer_than_the_topics_it_receives_from() -> None:
    """Before: 30 days, while chat text on generation.progress and the reply topics is gone after
    one; a dead letter is the original record, user text included."""
    sources = [t for t in topics.ALL if t != topics.DEAD_LETTER] + [topics.reply_topic("any-gateway")]
    shortest = min(retention_ms(t) for t in sources)
    assert retention_ms(topics.DEAD_LETTER) <= shortest, (retention_ms(topics.DEAD_LETTER), shortest)


def test_ready_needs_every_partition_with_a_leader() -> None:
    """What ensure_topics waits for after CreateTopics (the describe_topics shape of kafka-python)."""
    led = {"error_code": 0, "partitions": [{"partition_index": i, "leader_id": 1} for i in range(3)]}
    assert topics._ready(led, 3)
    assert not topics._ready({**led, "partitions": led["partitions"][:2]}, 3)
    assert not topics._ready({"error_code": 0, "partitions": [{"partition_index": 0, "leader_id": -1}]}, 1)
    assert not topics._ready({"error_code": 5, "partitions": []}, 1)
    assert not topics._ready({}, 1)


@pytest.mark.kafka
def test_a_group_formed_as_soon_as_ensure_topics_returns_is_given_every_partition(
        kafka_bootstrap: str, unique: str) -> None:
    """A CI run formed a group in the moment after CreateTopics, before the broker listed the
    partitions: the leader assigned nothing and kafka-python did not look again within 60 s."""
    from kafka import KafkaConsumer, TopicPartition

    name = f"t.ready.{unique}"
    assert topics.ensure_topics(kafka_bootstrap, [topics.Topic(name, 4, {})]) == [name]
    consumer = KafkaConsumer(name, bootstrap_servers=kafka_bootstrap, group_id=f"g.ready.{unique}",
                             enable_auto_commit=False)
    try:
        deadline = time.monotonic() + 30
        while len(consumer.assignment()) < 4 and time.monotonic() < deadline:
            consumer.poll(timeout_ms=100)
        assert consumer.assignment() == {TopicPartition(name, p) for p in range(4)}
    finally:
        consumer.close()
