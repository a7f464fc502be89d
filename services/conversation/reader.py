"""Tails the compacted history topic into a ConversationStore, with read-your-writes waits."""

from __future__ import annotations

import logging
import threading
import time

from colloquy.v1 import events_pb2
from kafka import TopicPartition

from services.common import events, kafka_loop, topics
from services.common.config import KafkaConfig
from services.common.runtime import ThreadWorker
from services.conversation.store import ConversationStore

log = logging.getLogger(__name__)


class HistoryReader(ThreadWorker):
    """Replays `conversation.turns` from the beginning, then follows it.

    Every replica reads all partitions (no consumer group): the store must hold every
    conversation a request may name. `wait_caught_up` blocks until everything committed to
    the topic before the call is applied, so turn N+1 always sees turn N.
    """

    def __init__(self, kafka: KafkaConfig, store: ConversationStore | None = None,
                 topic: str = topics.CONVERSATION_TURNS.name) -> None:
        super().__init__("history-reader")
        self.kafka = kafka
        self.store = store or ConversationStore()
        self.topic = topic
        self._positions: dict[int, int] = {}
        self._cond = threading.Condition()
        self._consumer = None
        self._probe = None
        self._probe_lock = threading.Lock()

    def stop(self, timeout: float = 10.0) -> None:
        super().stop(timeout)
        with self._probe_lock:
            if self._probe is not None:
                self._probe.close()
                self._probe = None

    def run(self) -> None:
        while not self.stopping:
            try:
                self._run()
            except Exception as exc:  # broker restarts: reconnect and carry on
                log.warning("history reader failed; reconnecting", extra={"error": repr(exc)})
                time.sleep(1)

    def _run(self) -> None:
        consumer = kafka_loop.make_consumer(self.kafka, None, "history-reader")
        try:
            parts = None
            while parts is None and not self.stopping:
                ids = consumer.partitions_for_topic(self.topic)
                if ids:
                    parts = [TopicPartition(self.topic, p) for p in sorted(ids)]
                else:
                    time.sleep(0.2)
            if parts is None:
                return
            consumer.assign(parts)
            consumer.seek_to_beginning(*parts)
            self._consumer = consumer
            self.mark_ready()
            while not self.stopping:
                batch = consumer.poll(timeout_ms=100)
                for tp, records in batch.items():
                    for rec in records:
                        if rec.value is None:
                            continue  # tombstone: a deleted turn
                        try:
                            self.store.apply(events.decode(rec.value, rec.headers, events_pb2.TurnRecord))
                        except events.PoisonEvent:
                            log.error("skipping an undecodable history record",
                                      extra={"partition": tp.partition, "offset": rec.offset})
                with self._cond:
                    for tp in parts:
                        self._positions[tp.partition] = consumer.position(tp)
                    self._cond.notify_all()
        finally:
            self._consumer = None
            consumer.close()

    def wait_for_turn(self, conversation_id: str, index: int, timeout: float = 5.0) -> bool:
        """Wait until turn `index` of the conversation is in the store (read-your-writes for a
        caller that just saw the turn finish: its record and its `done` share a transaction)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self.store.has_turn(conversation_id, index):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def wait_caught_up(self, timeout: float = 10.0, partitions: list[int] | None = None) -> bool:
        """Wait until the store reflects every record committed before this call."""
        with self._probe_lock:  # kafka-python consumers are not thread-safe
            if self._probe is None:
                self._probe = kafka_loop.make_consumer(self.kafka, None, "history-probe")
            try:
                ids = self._probe.partitions_for_topic(self.topic) or set()
                wanted = [TopicPartition(self.topic, p) for p in sorted(ids)
                          if partitions is None or p in partitions]
                ends = self._probe.end_offsets(wanted) if wanted else {}
            except Exception:
                self._probe.close()
                self._probe = None
                raise
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                if all(self._positions.get(tp.partition, -1) >= end for tp, end in ends.items()):
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
