"""The materializer: `conversation.turns` -> the conversation store, exactly once.

Why not the transactional StageWorker: the output is database rows, not Kafka records. Instead
the consumed offsets live in the database next to the rows, written in the same transaction, and
every (re)assigned partition is sought to its stored offset (the Kafka group's committed offsets
are never used). A crash before the commit loses the rows and their offsets together; one after
it keeps both: the batch is read again from the stored offsets, or not at all.

Each batch's offset update is conditional on the offset this worker last stored or read for the
partition, so a replica that lost a partition in a rebalance cannot commit over the new owner:
its transaction rolls back (OffsetsMoved) and it re-reads from the database.

Dead letters (a record that is not a TurnRecord, or a tombstone without a usable key) go to
`colloquy.dead-letter` with kafka_loop's DeadLetter, sent before the batch commits: at least once
(a crash between the send and the commit sends it again, same dlq-partition/dlq-offset headers).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable

from kafka import ConsumerRebalanceListener, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord

from services.common import kafka_loop, metrics
from services.common.config import KafkaConfig
from services.common.runtime import ThreadWorker
from services.common.turns import history_key
from services.conversation import domain
from services.conversation import metrics as conv_metrics
from services.conversation.db import ConversationDB, OffsetsMoved

log = logging.getLogger(__name__)

STAGE = "conversation"
BEHIND_LOG_EVERY_S = 10.0  # how often a store still catching up says where it is (start-up is otherwise silent)


class _Seeker(ConsumerRebalanceListener):
    """Seeks every newly assigned partition to its offset stored in the database."""

    def __init__(self, worker: Materializer) -> None:
        self.worker = worker

    def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        for tp in revoked:  # each batch commits before the next poll: nothing is in flight
            self.worker._expected.pop(tp.partition, None)
            self.worker._unseeked.discard(tp)

    def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        self.worker._unseeked.update(assigned)
        self.worker._seek_stored()


class Materializer(ThreadWorker):
    """Consumes the history topic into a ConversationDB; run as a ServiceApp worker. Ready
    (`ready`, `wait_ready`) means the store is migrated, answering and caught up."""

    def __init__(self, db: ConversationDB, kafka: KafkaConfig, *, topic: str, group_id: str,
                 instance_id: str, retry_seconds: float = 1.0,
                 before_commit: Callable[[int], None] | None = None) -> None:
        super().__init__("conversation-materializer")
        self.db = db
        self.kafka = kafka
        self.topic = topic
        self.group_id = group_id
        self.instance_id = instance_id
        self.retry_seconds = retry_seconds
        # Called with the batch number after a batch's rows are written, before its commit
        # (the test hook that SIGKILLs the process there).
        self.before_commit = before_commit
        self._consumer: KafkaConsumer | None = None
        self._producer: KafkaProducer | None = None
        self._expected: dict[int, int | None] = {}  # partition -> offset stored in the database
        self._unseeked: set[TopicPartition] = set()
        self._targets: dict[int, int] | None = None  # end offsets seen at start
        self._migrated = threading.Event()
        self._caught_up = threading.Event()
        self._db_ok = False
        self._batches = 0
        self._probe = kafka_loop.LagProbe(group_id, STAGE)
        self._last_ping = 0.0
        self._last_behind_log = time.monotonic()
        conv_metrics.READY.set(0)
        for outcome in ("written", "deleted_turn", "deleted_conversation", "tombstone_noop",
                        "ignored_other_owner", "ignored_deleted", "late_tombstoned"):
            conv_metrics.STORE_CHANGES.labels(outcome)
        metrics.EVENTS_DEAD_LETTERED.labels(STAGE, topic)

    # -- lifecycle (ThreadWorker: `stop` lets the batch in hand commit or roll back as a whole) ---
    def ready(self) -> bool:
        """Health: migrated, the database answered last time it was asked (at least once a
        second), and caught up once with the end offsets the topic had when this worker started.
        Reads flags only: it runs on the server's event loop."""
        ok = self._migrated.is_set() and self._caught_up.is_set() and self._db_ok
        conv_metrics.READY.set(1 if ok else 0)
        return ok

    def wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ready():
                return True
            if self.error is not None:
                return False
            time.sleep(0.05)
        return self.ready()

    # -- the loop -------------------------------------------------------------------------------
    def run(self) -> None:
        self._migrate()
        if self._stop.is_set():
            return
        client = f"{STAGE}-{self.instance_id}"
        consumer = self._new_consumer(client)
        self._consumer = consumer
        try:
            self._targets = self._end_offsets(consumer)
            log.info("end offsets at start", extra={"topic": self.topic, "end_offsets": self._targets})
            consumer.subscribe([self.topic], listener=_Seeker(self))
            while not self._stop.is_set():
                batch = kafka_loop.poll_through_outages(consumer, 200, STAGE)
                if self._unseeked:  # a seek failed (database down): drop what was read, seek again
                    batch = {tp: recs for tp, recs in batch.items() if tp not in self._unseeked}
                    self._seek_stored()
                if batch:
                    self._apply(batch)
                else:
                    self._store_positions()
                self._check_caught_up()
                self._ping_if_idle()
                if self._probe.stalled(consumer, expect_progress=self._db_ok and not self._unseeked):
                    consumer = self._replace_consumer(consumer, client)
        finally:
            self._consumer = None
            kafka_loop.close_leaving_group(consumer)
            if self._producer is not None:
                self._producer.close(timeout=5)

    def _migrate(self) -> None:
        while not self._stop.is_set():
            try:
                applied = self.db.migrate()
                log.info("store schema ready", extra={"applied": applied, "revision": self.db.schema_revision(),
                                                      "dialect": self.db.dialect})
                self._db_ok = True
                self._migrated.set()
                return
            except Exception as exc:
                self._db_failed("migrating the store failed; retrying", exc)
                self._stop.wait(self.retry_seconds)

    def _end_offsets(self, consumer: KafkaConsumer) -> dict[int, int]:
        while not self._stop.is_set():
            ids = consumer.partitions_for_topic(self.topic)
            if ids:
                parts = [TopicPartition(self.topic, p) for p in sorted(ids)]
                try:
                    return {tp.partition: off for tp, off in consumer.end_offsets(parts).items()}
                except Exception as exc:
                    log.warning("end offsets not available yet", extra={"error": repr(exc)})
            self._stop.wait(0.2)
        return {}

    def _seek_stored(self) -> None:
        """Seek every partition still waiting for it to its stored offset (beginning if none)."""
        consumer = self._consumer
        if consumer is None or not self._unseeked:
            return
        try:
            stored = self.db.stored_offsets(self.group_id, self.topic)
        except Exception as exc:
            self._db_failed("reading stored offsets failed; will retry", exc)
            time.sleep(self.retry_seconds)
            return
        self._db_ok = True
        owned = consumer.assignment()
        for tp in sorted(self._unseeked):
            if tp not in owned:  # revoked meanwhile: its new owner seeks it
                continue
            offset = stored.get(tp.partition)
            if offset is None:
                consumer.seek_to_beginning(tp)
            else:
                consumer.seek(tp, offset)
            self._expected[tp.partition] = offset
            log.info("resuming partition from the stored offset",
                     extra={"topic": self.topic, "partition": tp.partition, "offset": offset})
        self._unseeked.clear()

    def _apply(self, batch: dict[TopicPartition, list[ConsumerRecord]]) -> None:
        changes: list[domain.Change] = []
        new: dict[int, int] = {}
        poison: list[tuple[ConsumerRecord, str]] = []
        for tp, records in batch.items():
            for rec in records:
                metrics.EVENTS_CONSUMED.labels(STAGE, rec.topic).inc()
                change = domain.change_for(rec.key, rec.value, rec.headers, rec.partition, rec.offset,
                                           rec.timestamp)
                if isinstance(change, domain.Poison):
                    poison.append((rec, change.reason))
                else:
                    changes.append(change)
            new[tp.partition] = records[-1].offset + 1
        self._batches += 1
        number = self._batches
        started = time.perf_counter()
        if poison:
            try:
                self._dead_letter(poison)
            except Exception as exc:
                log.error("dead-lettering failed; redoing the batch from the stored offsets",
                          extra={"error": repr(exc)[:500]})
                self._reseek(new)
                time.sleep(self.retry_seconds)
                return
        try:
            hook = (lambda: self.before_commit(number)) if self.before_commit is not None else None
            outcome = self.db.apply(self.group_id, self.topic, changes,
                                    {p: self._expected.get(p) for p in new}, new, before_commit=hook)
        except OffsetsMoved as exc:
            conv_metrics.OFFSETS_MOVED.inc()
            log.warning("stored offsets moved under us; re-reading from the database", extra={"error": str(exc)})
            self._reseek(new)
            return
        except Exception as exc:
            self._db_failed("applying a batch failed; redoing it from the stored offsets", exc)
            self._reseek(new)
            time.sleep(self.retry_seconds)
            return
        self._db_ok = True
        conv_metrics.BATCH_SECONDS.observe(time.perf_counter() - started)
        self._expected.update(new)
        for name, n in outcome.items():
            conv_metrics.STORE_CHANGES.labels(name).inc(n)
        if outcome.get("ignored_deleted"):
            self._tombstone_late(changes)

    def _tombstone_late(self, changes: list[domain.Change]) -> None:
        """Turns recorded after their conversation was deleted (a turn still being answered when
        DeleteConversation ran) are ignored by the store; tombstone their keys too, so the
        compacted log keeps nothing of a deleted conversation. Best effort: a failure is logged
        (the store stays right either way)."""
        try:
            deleted: dict[str, bool] = {}
            late = []
            for ch in changes:
                if not isinstance(ch, domain.UpsertTurn):
                    continue
                cid = ch.record.conversation_id
                if cid not in deleted:
                    owner = self.db.owner(cid)
                    deleted[cid] = owner is not None and owner.deleted
                if deleted[cid]:
                    late.append(ch)
            if not late:
                return
            if self._producer is None:
                self._producer = kafka_loop.make_producer(self.kafka, f"{STAGE}-{self.instance_id}-dlq")
            futures = [self._producer.send(self.topic, key=history_key(ch.record.conversation_id,
                                                                       ch.record.turn.index).encode(),
                                           value=None, partition=ch.partition) for ch in late]
            for f in futures:
                f.get(timeout=10)
            conv_metrics.STORE_CHANGES.labels("late_tombstoned").inc(len(late))
            log.info("tombstoned turns recorded after their conversation was deleted", extra={"turns": len(late)})
        except Exception as exc:
            log.error("could not tombstone turns of a deleted conversation", extra={"error": repr(exc)[:500]})

    def _reseek(self, partitions: dict[int, int]) -> None:
        self._unseeked.update(TopicPartition(self.topic, p) for p in partitions)
        self._seek_stored()

    def _store_positions(self) -> None:
        """With nothing to read, store the consumer's position when it is past the stored offset:
        transaction markers take offsets too, and the store is caught up only once its offsets
        reach the end offsets."""
        consumer = self._consumer
        if consumer is None or self._unseeked:
            return
        new: dict[int, int] = {}
        for tp in consumer.assignment():
            try:
                pos = consumer.position(tp, timeout_ms=1000)
            except Exception:
                continue
            stored = self._expected.get(tp.partition)
            if pos is not None and pos > (stored if stored is not None else 0):
                new[tp.partition] = pos
        if not new:
            return
        try:
            self.db.apply(self.group_id, self.topic, [], {p: self._expected.get(p) for p in new}, new)
        except OffsetsMoved:
            conv_metrics.OFFSETS_MOVED.inc()
            self._reseek(new)
            return
        except Exception as exc:
            self._db_failed("storing positions failed", exc)
            return
        self._db_ok = True
        self._expected.update(new)

    def _ping_if_idle(self) -> None:
        """An idle worker asks the database nothing; ask once a second so health notices it going."""
        now = time.monotonic()
        if now - self._last_ping < 1.0:
            return
        self._last_ping = now
        try:
            self.db.ping()
            self._db_ok = True
        except Exception as exc:
            self._db_failed("the store does not answer", exc)

    def _check_caught_up(self) -> None:
        if self._caught_up.is_set() or self._targets is None:
            return
        try:
            stored = self.db.stored_offsets(self.group_id, self.topic)
        except Exception as exc:
            self._db_failed("reading stored offsets failed", exc)
            return
        self._db_ok = True
        if all(stored.get(p, 0) >= end for p, end in self._targets.items()):
            self._caught_up.set()
            log.info("store caught up with the topic", extra={"topic": self.topic, "stored_offsets": stored})
        elif time.monotonic() - self._last_behind_log >= BEHIND_LOG_EVERY_S:
            self._last_behind_log = time.monotonic()
            log.info("store still catching up with the topic", extra={
                "topic": self.topic, "end_offsets": self._targets, "stored_offsets": stored,
                "positions": self._positions(), "batches": self._batches})

    def _positions(self) -> dict[int, int | None]:
        """Where the consumer is reading, for the "still catching up" line (None: not known yet)."""
        consumer = self._consumer
        if consumer is None:
            return {}
        out: dict[int, int | None] = {}
        for tp in consumer.assignment():
            try:
                out[tp.partition] = consumer.position(tp, timeout_ms=200)
            except Exception:
                out[tp.partition] = None
        return out

    def _db_failed(self, what: str, exc: Exception) -> None:
        self._db_ok = False
        conv_metrics.DB_ERRORS.inc()
        log.error(what, extra={"error": repr(exc)[:500]})

    def _dead_letter(self, poison: list[tuple[ConsumerRecord, str]]) -> None:
        if self._producer is None:
            self._producer = kafka_loop.make_producer(self.kafka, f"{STAGE}-{self.instance_id}-dlq")
        futures = []
        for rec, reason in poison:
            dl = kafka_loop.DeadLetter(rec, STAGE, reason, "PoisonEvent", "")
            futures.append(self._producer.send(dl.topic, key=dl.key.encode(), value=dl.message.SerializeToString(),
                                               headers=dl.headers()))
            log.error("dead-lettered a history record", extra={"topic": rec.topic, "partition": rec.partition,
                                                               "offset": rec.offset, "reason": reason})
        for f in futures:
            f.get(timeout=10)
        for rec, _ in poison:
            metrics.EVENTS_DEAD_LETTERED.labels(STAGE, rec.topic).inc()

    def _replace_consumer(self, consumer: KafkaConsumer, client: str) -> KafkaConsumer:
        """Leave the group with a consumer that stopped reading and join with a new one, which
        seeks each partition it gets to the offset stored in the database (_Seeker)."""
        self._consumer = None
        kafka_loop.close_leaving_group(consumer)
        self._expected.clear()
        self._unseeked.clear()
        consumer = self._new_consumer(client)
        consumer.subscribe([self.topic], listener=_Seeker(self))
        self._consumer = consumer
        return consumer

    def _new_consumer(self, client: str) -> KafkaConsumer:
        return kafka_loop.make_consumer(self.kafka, self.group_id, client, group_instance_id=client)


def kill_before_commit(batch: int) -> Callable[[int], None]:
    """The CONVERSATION_FAULT_KILL_BEFORE_COMMIT hook: SIGKILL this process when batch `batch`
    has written its rows and not committed them (tests prove nothing is lost or doubled)."""

    def hook(number: int) -> None:
        if number == batch:
            log.warning("fault injection: SIGKILL before commit", extra={"batch": number})
            os.kill(os.getpid(), signal.SIGKILL)

    return hook
