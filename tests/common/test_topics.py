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
