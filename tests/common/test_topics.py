"""The topic table (services/common/topics.py): rules that hold between its entries."""

from __future__ import annotations

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


def test_report_lag_sets_each_assigned_partitions_gap_and_survives_a_failed_probe() -> None:
    """The one lag probe the stage loop and the conversation materializer share (a stub consumer:
    this checks the arithmetic and the error path, the loops' own tests use the real broker)."""
    from kafka import TopicPartition
    from prometheus_client import REGISTRY

    from services.common import kafka_loop

    a, b = TopicPartition("t.lag", 0), TopicPartition("t.lag", 1)

    class Consumer:
        def assignment(self) -> set[TopicPartition]:
            return {a, b}

        def end_offsets(self, parts: list[TopicPartition]) -> dict[TopicPartition, int]:
            return {a: 10, b: 3}

        def position(self, tp: TopicPartition) -> int:
            return {a: 4, b: 3}[tp]

    kafka_loop.report_lag(Consumer(), "g.lag")  # type: ignore[arg-type]
    lag = {p: REGISTRY.get_sample_value("colloquy_kafka_consumer_lag", {"group": "g.lag", "topic": "t.lag",
                                                                   "partition": p}) for p in ("0", "1")}
    assert lag == {"0": 6.0, "1": 0.0}

    class Broken(Consumer):
        def end_offsets(self, parts: list[TopicPartition]) -> dict[TopicPartition, int]:
            raise OSError("broker gone")

    kafka_loop.report_lag(Broken(), "g.lag")  # type: ignore[arg-type]
