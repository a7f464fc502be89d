"""Retention: conversations idle longer than CONVERSATION_RETENTION_DAYS are deleted, the same
way DeleteConversation deletes one (deletion.Eraser: feedback erasure, tombstones, the store).

Runs in the conversation service, next to the materializer, and only while the materializer is
ready: a store behind the topic could take a conversation with newer turns for an idle one.
Several replicas may sweep at once: a conversation deleted twice is deleted once (the second
finds it gone).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from kafka import KafkaProducer
from prometheus_client import Counter

from services.common import topics
from services.common.runtime import ThreadWorker
from services.conversation.db import ConversationDB
from services.conversation.deletion import Eraser

log = logging.getLogger(__name__)

DAY_MS = 86_400_000
BATCH = 500

SWEPT = Counter("colloquy_conversation_retention_deleted_total",
                "Conversations deleted by the retention sweep (idle longer than the retention period)")
SWEEP_ERRORS = Counter("colloquy_conversation_retention_errors_total",
                       "Retention sweeps that stopped on an error (retried at the next sweep)")


def cutoff_ms(now_ms: int, days: float) -> int:
    """Conversations whose last activity is before this are past retention."""
    return now_ms - int(days * DAY_MS)


class RetentionSweeper(ThreadWorker):
    """Every `interval_s`, deletes the conversations idle for more than `days` (0: never)."""

    def __init__(self, db: ConversationDB, make_producer: Callable[[], KafkaProducer], *, days: float,
                 interval_s: float, turns_topic: str, store_ready: Callable[[], bool],
                 feedback_topic: str = topics.CHAT_FEEDBACK.name, clock: Callable[[], float] = time.time) -> None:
        super().__init__("conversation-retention")
        self.db = db
        self.make_producer = make_producer
        self.days = days
        self.interval_s = interval_s
        self.turns_topic = turns_topic
        self.feedback_topic = feedback_topic
        self.store_ready = store_ready
        self.clock = clock
        self._producer: KafkaProducer | None = None

    def run(self) -> None:
        if self.days <= 0:
            return  # keep forever
        try:
            while not self.stopping:
                wait = 1.0  # the store is not ready yet: look again soon
                if self.store_ready():
                    wait = self.interval_s
                    try:
                        self.sweep()
                    except Exception as exc:
                        SWEEP_ERRORS.inc()
                        log.error("retention sweep failed; retrying at the next one",
                                  extra={"error": repr(exc)[:500]})
                self._stop.wait(wait)
        finally:
            if self._producer is not None:
                self._producer.close(timeout=5)

    def sweep(self) -> int:
        """Delete every conversation past retention now; returns how many were deleted."""
        if self._producer is None:
            self._producer = self.make_producer()
        eraser = Eraser(self.db, self._producer, turns_topic=self.turns_topic, feedback_topic=self.feedback_topic)
        before = cutoff_ms(int(self.clock() * 1000), self.days)
        deleted = 0
        while not self.stopping:
            idle = self.db.idle_conversations(before, BATCH)
            for conversation_id, user_id in idle:
                if self.stopping:
                    break
                if eraser.erase(conversation_id, user_id, "retention") is not None:
                    deleted += 1
                    SWEPT.inc()
            if len(idle) < BATCH:
                break
        if deleted:
            log.info("retention sweep deleted idle conversations", extra={"deleted": deleted, "days": self.days})
        return deleted
