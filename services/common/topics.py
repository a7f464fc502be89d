"""Every Kafka topic Colloquy uses, declared once.

The k8s KafkaTopic manifests are checked against this list by a test, and services create
the topics idempotently at startup (`ensure_topics`).
"""

from __future__ import annotations

import dataclasses
import logging
import time

from kafka import KafkaAdminClient
from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError

from services.common.config import KafkaConfig

log = logging.getLogger(__name__)

DAY_MS = 24 * 3600 * 1000
EVENTS = {"cleanup.policy": "delete", "retention.ms": str(7 * DAY_MS)}
STREAM = {"cleanup.policy": "delete", "retention.ms": str(DAY_MS)}
STATE = {"cleanup.policy": "compact", "min.compaction.lag.ms": "60000", "segment.ms": str(DAY_MS)}


@dataclasses.dataclass(frozen=True)
class Topic:
    name: str
    partitions: int
    configs: dict[str, str]
    replication: int = 1
    doc: str = ""


CHAT_REQUESTS = Topic("chat.requests", 6, EVENTS, doc="TurnEvent from the gateway")
CHAT_TOKENIZED = Topic("chat.tokenized", 6, EVENTS,
                       doc="TurnEvent with message token count (tokenizer stage in the chain only)")
CHAT_MODERATED = Topic("chat.moderated", 6, EVENTS, doc="TurnEvent that passed input moderation")
CHAT_PROMPTS = Topic("chat.prompts", 6, EVENTS, doc="TurnEvent with the assembled prompt")
GENERATION_PROGRESS = Topic("generation.progress", 6, STREAM, doc="GenerationProgress batches")
CHAT_CANCELS = Topic("chat.cancels", 6, STREAM, doc="CancelEvent")
CHAT_UNANSWERED = Topic("chat.unanswered", 6, STREAM,
                        doc="TurnUnanswered: a turn generation failed, never recorded; frees its conversation")
CONVERSATION_TURNS = Topic("conversation.turns", 6, STATE,
                           doc="TurnRecord keyed <conversation>/<turn>, compacted: the history")
MODERATION_DECISIONS = Topic("moderation.decisions", 3, EVENTS, doc="ModerationDecision audit trail")
CHAT_FEEDBACK = Topic("chat.feedback", 3, {**EVENTS, "retention.ms": str(30 * DAY_MS)},
                      doc="FeedbackEvent")
MODEL_UPDATES = Topic("model.updates", 1, EVENTS, doc="ModelUpdate")
# Holds user text from every topic a stage reads, so it keeps it no longer than the shortest of
# them (generation.progress and the reply topics: a day); tests/common/test_topics.py checks.
DEAD_LETTER = Topic("colloquy.dead-letter", 3, STREAM,
                    doc="records no stage could process, with the reason in headers")

ALL: tuple[Topic, ...] = (
    CHAT_REQUESTS, CHAT_TOKENIZED, CHAT_MODERATED, CHAT_PROMPTS, GENERATION_PROGRESS, CHAT_CANCELS,
    CHAT_UNANSWERED, CONVERSATION_TURNS, MODERATION_DECISIONS, CHAT_FEEDBACK, MODEL_UPDATES, DEAD_LETTER,
)

REPLY_PREFIX = "chat.replies."


def renamed(kind: Topic, name: str) -> Topic:
    """`kind`'s partitions and settings under another name (a test's or a canary's topic)."""
    return dataclasses.replace(kind, name=name)


def reply_topic(gateway_instance: str) -> Topic:
    """Per-gateway-replica reply topic: a replica reads only the replies to its own streams."""
    return Topic(REPLY_PREFIX + gateway_instance, 1, STREAM, doc="ReplyEvent for one gateway replica")


def ensure_topics(bootstrap: str, topics: tuple[Topic, ...] | list[Topic] = ALL,
                  kafka: KafkaConfig | None = None) -> list[str]:
    """Create missing topics; existing ones are left as they are. Returns the names created.

    `kafka` carries security settings; without it, `bootstrap` is used in plaintext.
    """
    conn = kafka.client_kwargs() if kafka is not None else {"bootstrap_servers": bootstrap}
    admin = KafkaAdminClient(**conn, client_id="colloquy-topics")
    try:
        existing = set(admin.list_topics())
        missing = [t for t in topics if t.name not in existing]
        created: list[str] = []
        for t in missing:
            try:
                admin.create_topics([NewTopic(t.name, t.partitions, t.replication, topic_configs=t.configs)])
                created.append(t.name)
            except TopicAlreadyExistsError:
                pass  # another service created it meanwhile
        if created:
            log.info("created topics", extra={"topics": created})
            _wait_ready(admin, {t.name: t.partitions for t in missing})
        return created
    finally:
        admin.close()


def _ready(description: dict, partitions: int) -> bool:
    """A topic's metadata lists every partition, each with a leader."""
    parts = description.get("partitions") or []
    return (description.get("error_code", 0) == 0 and len(parts) == partitions
            and all(p.get("leader_id", -1) >= 0 for p in parts))


def _wait_ready(admin: KafkaAdminClient, partitions: dict[str, int], timeout: float = 10.0) -> None:
    """CreateTopics returns before the broker's metadata lists the new topic's partitions and
    leaders. A consumer group formed in that window is assigned nothing and, kafka-python
    refreshing metadata only every 5 minutes, stays idle that long (a CI run saw it); producers
    that send right away would wait for metadata too. So wait until the partitions are there."""
    deadline = time.monotonic() + timeout
    while True:
        described = {d.get("name"): d for d in admin.describe_topics(sorted(partitions))}
        if all(_ready(described.get(name) or {}, n) for name, n in partitions.items()):
            return
        if time.monotonic() > deadline:
            log.warning("created topics have no leader for every partition yet",
                        extra={"topics": sorted(partitions)})
            return
        time.sleep(0.1)


def partition_for(key: str, partitions: int) -> int:
    """The partition Kafka's default partitioner picks for `key` (murmur2, as the Java client).

    Records keyed by something other than the conversation id (e.g. "<conversation>/<turn>" on
    the compacted history) use this so they still land on the conversation's partition.
    """
    from kafka.partitioner.default import murmur2

    return (murmur2(key.encode()) & 0x7FFFFFFF) % partitions
