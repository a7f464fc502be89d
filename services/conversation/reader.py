"""The readers' side of the conversation store (gateway, prompt stage): the database plus the
waits that keep read-your-writes, and the startup check behind their health.

Nothing is held in memory: every read goes to the database the materializer writes. What the
in-memory replay used to give for free is made explicit here:
- `wait_caught_up(partitions)`: the materializer's stored offsets for those partitions have
  reached the topic's read-committed end offsets taken at the call, so every turn committed
  before it is in the store (turn N+1's prompt sees turn N).
- readiness: the database answers, is at the newest migration (the materializer migrates; a
  reader never does) and has caught up with the end offsets the topic had when this process
  started.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable

from kafka import KafkaConsumer, TopicPartition

from services.common import kafka_loop
from services.common.config import KafkaConfig
from services.common.runtime import ThreadWorker
from services.conversation.config import StoreConfig
from services.conversation.db import ConversationDB

log = logging.getLogger(__name__)

POLL_S = (0.005, 0.05)  # the first and the longest pause between polls of the database


class StoreReader(ThreadWorker):
    """A ConversationDB for readers. As a worker it only decides readiness, then returns."""

    def __init__(self, db: ConversationDB, kafka: KafkaConfig, *, topic: str, group_id: str,
                 retry_seconds: float = 1.0) -> None:
        super().__init__("conversation-store-reader")
        self.db = db
        self.kafka = kafka
        self.topic = topic
        self.group_id = group_id  # the materializer's group: whose stored offsets say "caught up"
        self.retry_seconds = retry_seconds
        self._probe: KafkaConsumer | None = None
        self._probe_lock = threading.Lock()  # kafka-python consumers are not thread-safe

    def stop(self, timeout: float = 10.0) -> None:
        super().stop(timeout)
        with self._probe_lock:
            if self._probe is not None:
                self._probe.close()
                self._probe = None

    # -- readiness (the worker thread) ----------------------------------------------------------
    def run(self) -> None:
        head = ConversationDB.head_revision()
        at_head = False  # asked until true (only the materializer migrates); each ask logs two alembic lines
        targets: dict[int, int] | None = None
        waiting_for = ""
        while not self.stopping:
            try:
                revision = head if at_head else self.db.schema_revision()
                at_head = revision == head
                if not at_head:
                    what = f"schema at {revision}, waiting for {head} (the materializer migrates)"
                elif targets is None:
                    targets = self.end_offsets()
                    log.info("store reader: end offsets at start", extra={"end_offsets": targets})
                    continue
                else:
                    stored = self.db.stored_offsets(self.group_id, self.topic)
                    behind = {p: (stored.get(p, 0), end) for p, end in targets.items() if stored.get(p, 0) < end}
                    if not behind:
                        log.info("conversation store reachable and caught up", extra={"end_offsets": targets})
                        self.mark_ready()
                        return
                    what = f"materializer behind the topic on {len(behind)} partition(s)"
            except Exception as exc:
                what = f"store not reachable: {exc!r}"[:300]
            if what != waiting_for:
                log.warning("conversation store not ready yet", extra={"reason": what})
                waiting_for = what
            # Catching up is usually a matter of moments: look again soon then.
            self._stop.wait(min(self.retry_seconds, 0.2) if what.startswith("materializer") else self.retry_seconds)

    # -- read-your-writes waits (blocking: call from a thread) ----------------------------------
    def end_offsets(self, partitions: Iterable[int] | None = None) -> dict[int, int]:
        """The topic's read-committed end offsets (all partitions, or those named). Raises on a
        broker that does not answer."""
        with self._probe_lock:
            if self._probe is None:
                self._probe = kafka_loop.make_consumer(self.kafka, None, "conversation-store-probe")
            try:
                ids = self._probe.partitions_for_topic(self.topic)
                if not ids:
                    raise RuntimeError(f"topic {self.topic} has no partitions (yet)")
                wanted = [TopicPartition(self.topic, p) for p in sorted(ids)
                          if partitions is None or p in set(partitions)]
                return {tp.partition: off for tp, off in self._probe.end_offsets(wanted).items()}
            except Exception:
                self._probe.close()
                self._probe = None
                raise

    def wait_caught_up(self, partitions: list[int], timeout: float) -> bool:
        """True once the store holds every record committed to `partitions` before this call;
        False after `timeout`. Raises when the broker or the database cannot be asked."""
        ends = self.end_offsets(partitions)
        return _poll(lambda: self._reached(ends), timeout)

    def _reached(self, ends: dict[int, int]) -> bool:
        stored = self.db.stored_offsets(self.group_id, self.topic)
        return all(stored.get(p, 0) >= end for p, end in ends.items())


def _poll(check: Callable[[], bool], timeout: float) -> bool:
    """Call `check` until it is true or `timeout` passes, backing off from 5 to 50 ms."""
    deadline = time.monotonic() + timeout
    pause = POLL_S[0]
    while True:
        if check():
            return True
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(pause, left))
        pause = min(pause * 2, POLL_S[1])


def open_reader(kafka: KafkaConfig, cfg: StoreConfig) -> StoreReader:
    """The store a gateway or prompt replica reads: the database, topic and group the materializer
    is configured with (the same CONVERSATION_DB / DATABASE_URL settings)."""
    return StoreReader(ConversationDB(cfg.url, cfg.busy_timeout_ms), kafka, topic=cfg.topic,
                       group_id=cfg.group_id, retry_seconds=cfg.retry_seconds)
