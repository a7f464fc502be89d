"""Kafka stage: chat.feedback -> Parquet files (and a deleted conversation's rows out of them).

Why not the transactional StageWorker: the output is files, not Kafka records. Offsets are
committed only after a batch's file is fsynced, renamed into place and its directory fsynced
(`dataset.write_rows`), so a power cut cannot lose rows whose offsets are committed
(at-least-once); a redelivered batch rewrites the same file, and `dataset.read` keeps one row
per submission.
"""

from __future__ import annotations

import logging
from pathlib import Path

from colloquy.v1 import events_pb2
from kafka.structs import OffsetAndMetadata
from prometheus_client import Counter

from services.common import events, kafka_loop, metrics, topics
from services.common.config import KafkaConfig
from services.feedback import dataset

log = logging.getLogger(__name__)


ERASED = events_pb2.ConversationErased.DESCRIPTOR.full_name
ERASED_ROWS = Counter("colloquy_feedback_erased_rows_total",
                      "Dataset rows removed because their conversation was deleted")
# Thumbs by the model version rated: a canary's thumbs-up ratio against the stable version's
# (rlhf.canary). Counted once a batch's file is in place; a redelivered batch counts again (rare:
# a crash between the file and the offset commit). Versions, two verdicts and two sources only.
RATINGS = Counter("colloquy_feedback_ratings_total",
                  "Thumbs up/down ratings written to the dataset, by the model version that answered, "
                  "the verdict (up, down) and the source (human, simulated)",
                  ["model_version", "verdict", "source"])


def count_rating(event: events_pb2.FeedbackEvent) -> None:
    """Count a Rating (rankings have no thumbs) under the version that wrote the answer."""
    if event.WhichOneof("feedback") != "rating":
        return
    RATINGS.labels(event.model_version or "unknown", "up" if event.rating.thumbs_up else "down",
                   "simulated" if event.source == "simulated" else "human").inc()


class FeedbackSink(kafka_loop.GroupReader[events_pb2.FeedbackEvent]):
    """Writes chat.feedback to the dataset; ready once it holds partitions."""

    def __init__(self, kafka: KafkaConfig, root: Path, instance_id: str, *,
                 topic: str = topics.CHAT_FEEDBACK.name, group_id: str = "colloquy-feedback") -> None:
        # Feedback is not on a user's critical path: a long fetch wait instead of the stages'
        # 5 ms, so an idle sink does not spend a share of a core asking for records every 5 ms.
        super().__init__("feedback", [topic], events_pb2.FeedbackEvent, kafka, group_id=group_id,
                         instance_id=instance_id, thread_name="feedback-sink",
                         consumer_overrides={"fetch_max_wait_ms": 500})
        self.root = root

    @staticmethod
    def _erasure(value: bytes | None, headers: list[tuple[str, bytes]] | None) -> str:
        msg = events.decode(value, headers, events_pb2.ConversationErased)
        if not msg.conversation_id:
            raise events.PoisonEvent("ConversationErased without a conversation_id")
        return msg.conversation_id

    def run(self) -> None:
        consumer = self._new_consumer()
        producer = None
        try:
            while not self.stopping:
                consumer, batch = self._poll(consumer)
                offsets = {}
                for tp, records in batch.items():
                    rows, rated = [], []
                    erased: set[str] = set()
                    for rec in records:
                        metrics.EVENTS_CONSUMED.labels("feedback", rec.topic).inc()
                        try:
                            if events.header(rec.headers, events.H_TYPE) == ERASED:
                                erased.add(self._erasure(rec.value, rec.headers))
                                continue
                            event = events.decode(rec.value, rec.headers, events_pb2.FeedbackEvent)
                            rows.append(dataset.row(event))
                            rated.append(event)
                        except events.PoisonEvent as exc:
                            if producer is None:
                                producer = kafka_loop.make_producer(self.cfg, "feedback-dlq")
                            dl = kafka_loop.DeadLetter(rec, "feedback", str(exc), "PoisonEvent", "")
                            kafka_loop.send_event(producer, dl).get(timeout=10)
                            metrics.EVENTS_DEAD_LETTERED.labels("feedback", rec.topic).inc()
                    if rows:
                        dataset.write_rows(self.root, rows, tp.partition, records[0].offset, records[-1].offset)
                        for event in rated:
                            count_rating(event)
                    if erased:  # after this batch's rows: feedback that raced the deletion goes too
                        removed = dataset.erase(self.root, erased)
                        ERASED_ROWS.inc(removed)
                        log.info("erased deleted conversations' feedback",
                                 extra={"conversations": len(erased), "rows": removed})
                    offsets[tp] = OffsetAndMetadata(records[-1].offset + 1, "", -1)
                if offsets:
                    consumer.commit(offsets)
        finally:
            kafka_loop.close_leaving_group(consumer)
            if producer is not None:
                producer.close(timeout=5)
