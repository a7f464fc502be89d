"""Reply topics of gateways that are gone: their gateway marks them alive, a sweep deletes the rest.

Why: each gateway replica reads its own `chat.replies.<instance>`. With a stable replica id a
restarted replica takes its topic back, but one gone for good (scaled down, a local run on
another port) leaves its topic behind, and Kafka cannot say whether anyone still reads it: the
ReplyRouter reads by assignment, outside any consumer group's membership. So each gateway
commits a mark under a consumer group named after its topic every `mark_interval_s`: its read
position, with the time in the offset's metadata (`alive-ms=<unix ms>`).

Every gateway sweeps at start and then every `sweep_interval_s`: a reply topic whose newest mark
is older than `REPLY_TOPIC_MAX_IDLE_SECONDS` is deleted, with its group. A topic with no mark
(made before marks existed, or just created) is given one by the sweep, so it too is deleted
once it has gone that long without its own gateway marking it. A gateway that cannot reach the
broker for that long loses its topic; it makes it again at its next start.
"""

from __future__ import annotations

import logging
import time

from kafka import KafkaAdminClient, TopicPartition
from kafka.structs import OffsetAndMetadata

from services.common.config import KafkaConfig
from services.common.runtime import ThreadWorker
from services.common.topics import REPLY_PREFIX

log = logging.getLogger(__name__)

ALIVE = "alive-ms="


def mark(now_ms: int | None = None) -> str:
    """The offset metadata that says a reply topic's gateway was alive at `now_ms`."""
    return f"{ALIVE}{int(time.time() * 1000) if now_ms is None else now_ms}"


def marked_at(metadata: str | None) -> int | None:
    """When a mark says its gateway was alive (unix ms), or None for no mark."""
    if not metadata or not metadata.startswith(ALIVE):
        return None
    try:
        return int(metadata[len(ALIVE):])
    except ValueError:
        return None


def mark_interval_s(max_idle_s: float) -> float:
    """How often a gateway marks its topic: often enough that a live one is never taken for gone."""
    return min(60.0, max_idle_s / 4)


class ReplyTopicJanitor(ThreadWorker):
    """Deletes the reply topics (and their mark groups) of gateways that are gone."""

    def __init__(self, kafka: KafkaConfig, own_topic: str, max_idle_s: float,
                 sweep_interval_s: float | None = None, scope: str = REPLY_PREFIX) -> None:
        super().__init__("reply-topic-janitor")
        self.kafka = kafka
        self.own_topic = own_topic
        self.scope = scope  # only topics named with this prefix (a test sweeps its own alone)
        self.max_idle_ms = int(max_idle_s * 1000)
        self.sweep_interval_s = min(300.0, max_idle_s / 2) if sweep_interval_s is None else sweep_interval_s

    def sweep(self, now_ms: int | None = None) -> list[str]:
        """One pass; returns the topics deleted."""
        now = int(time.time() * 1000) if now_ms is None else now_ms
        admin = KafkaAdminClient(**self.kafka.client_kwargs(), client_id="gateway-reply-janitor")
        try:
            names = sorted(n for n in admin.list_topics() if n.startswith(self.scope) and n != self.own_topic)
            if not names:
                return []
            committed = admin.list_group_offsets({n: [TopicPartition(n, 0)] for n in names})
            gone = []
            for name in names:
                offset = (committed.get(name) or {}).get(TopicPartition(name, 0))
                at = marked_at(offset.metadata if offset is not None else None)
                if at is None:  # never marked: start its clock now
                    admin.alter_group_offsets(name, {TopicPartition(name, 0): OffsetAndMetadata(
                        offset.offset if offset is not None and offset.offset >= 0 else 0, mark(now), -1)})
                elif now - at > self.max_idle_ms:
                    gone.append(name)
            if gone:
                admin.delete_topics(gone, raise_errors=False)
                admin.delete_groups(gone)
                log.info("deleted the reply topics of gateways that are gone", extra={
                    "topics": gone, "max_idle_s": self.max_idle_ms / 1000})
            return gone
        finally:
            admin.close()

    def run(self) -> None:
        self.mark_ready()
        while not self.stopping:
            try:
                self.sweep()
            except Exception as exc:  # a broker restart or a missing right must not stop the gateway
                log.warning("reply topic sweep failed", extra={"error": repr(exc)})
            self._stop.wait(self.sweep_interval_s)
