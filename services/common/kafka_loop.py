"""The consume -> process -> produce loop every pipeline stage runs.

Delivery: each polled batch is processed inside one Kafka transaction that holds the produced
records *and* the consumed offsets (KIP-98/447, supported by kafka-python 3). Downstream
consumers read with `isolation_level=read_committed`, so a stage killed mid-batch leaves no
visible output and its batch is redone: no loss, no duplicate. State kept outside Kafka must
dedupe on the event id itself (`SeenEvents` helps).

Failure: a record that cannot be decoded goes straight to the dead-letter topic; a handler
error is retried with exponential backoff a bounded number of times and then dead-lettered,
with the reason in its headers, while the loop carries on with the next record.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

from google.protobuf.message import Message
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from services.common import events, metrics, transactions
from services.common.config import KafkaConfig
from services.common.log import request_id_var
from services.common.topics import DEAD_LETTER

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)


@dataclasses.dataclass
class Consumed(Generic[M]):
    """A decoded record handed to a stage's handler."""

    message: M
    key: str
    event_id: str
    request_id: str
    traceparent: str
    topic: str
    partition: int
    offset: int

    def out(self, topic: str, message: Message, key: str | None = None) -> events.OutEvent:
        """An output event that keeps this record's key, request id and trace context."""
        return events.OutEvent(topic=topic, key=self.key if key is None else key, message=message,
                               request_id=self.request_id, traceparent=self.traceparent)


Handler = Callable[[Consumed[M]], Iterable[events.OutEvent]]


class SeenEvents:
    """Bounded memory of processed event ids, for side effects outside Kafka transactions."""

    def __init__(self, capacity: int = 100_000) -> None:
        self._ids: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._capacity = capacity

    def check_and_add(self, event_id: str) -> bool:
        """True if `event_id` is new (and now remembered)."""
        if event_id in self._ids:
            self._ids.move_to_end(event_id)
            return False
        self._ids[event_id] = None
        if len(self._ids) > self._capacity:
            self._ids.popitem(last=False)
        return True


def make_producer(cfg: KafkaConfig, client_id: str, transactional_id: str | None = None) -> KafkaProducer:
    """A producer tuned for latency: idempotent, acks=all, no linger."""
    # max_block_ms bounds how long send() waits for metadata (e.g. a topic that does not exist).
    kwargs: dict = {**cfg.client_kwargs(), "client_id": client_id, "linger_ms": 0,
                    "acks": "all", "enable_idempotence": True, "max_block_ms": 10_000}
    if transactional_id:
        kwargs["transactional_id"] = transactional_id
        # A producer killed mid-transaction holds back every read_committed consumer of the
        # partitions it wrote (the last stable offset stops) until the coordinator aborts it:
        # at restart with the same id, or after this timeout. Batches take well under a second,
        # so 20 s instead of 60 s bounds that stall when a replica is not coming back.
        kwargs["transaction_timeout_ms"] = 20_000
    return KafkaProducer(**kwargs)


def make_consumer(cfg: KafkaConfig, group_id: str | None, client_id: str, *topics: str,
                  **overrides: object) -> KafkaConsumer:
    """A read_committed consumer with manual commits and a short fetch wait."""
    kwargs: dict = {
        **cfg.client_kwargs(), "group_id": group_id, "client_id": client_id,
        "enable_auto_commit": False, "isolation_level": "read_committed",
        "auto_offset_reset": "earliest", "fetch_max_wait_ms": cfg.fetch_max_wait_ms,
        "max_poll_records": cfg.max_poll_records,
    }
    if group_id:
        # A dead member's partitions move after 10 s instead of kafka-python's 45 s default.
        kwargs.update(session_timeout_ms=10_000, heartbeat_interval_ms=1_000)
    kwargs.update(overrides)
    return KafkaConsumer(*topics, **kwargs)


_outage_logged: dict[str, float] = {}


def poll_through_outages(consumer: KafkaConsumer, timeout_ms: int, who: str) -> dict:
    """`consumer.poll`, riding out a broker restart.

    kafka-python 3 raises retriable errors out of poll() itself (KafkaConnectionError while the
    group coordinator cannot be reached). Left alone that ends the worker thread and so the
    service, which nothing restarts outside Kubernetes; the consumer reconnects by itself if we
    simply poll again. Other errors still propagate.
    """
    try:
        return consumer.poll(timeout_ms=timeout_ms)
    except KafkaError as exc:
        if not exc.retriable:
            raise
        now = time.monotonic()
        if now - _outage_logged.get(who, 0.0) >= 5:  # one line per 5 s, not one per poll
            _outage_logged[who] = now
            log.warning("Kafka unreachable; polling again", extra={"stage": who, "error": repr(exc)})
        time.sleep(min(0.5, timeout_ms / 1000))
        return {}


class StageWorker(Generic[M]):
    """Runs one stage: consume `topics` as `group_id`, call `handler`, produce its events."""

    def __init__(
        self,
        stage: str,
        topics: list[str],
        message_type: type[M],
        handler: Handler[M],
        kafka: KafkaConfig,
        *,
        group_id: str | None = None,
        instance_id: str = "0",
    ) -> None:
        self.stage = stage
        self.topics = topics
        for topic in topics:  # zero from the start: dashboards and alerts see 0, not "no data"
            metrics.EVENTS_FAILED.labels(stage, topic)
            metrics.EVENTS_DEAD_LETTERED.labels(stage, topic)
        self.message_type = message_type
        self.handler = handler
        self.cfg = kafka
        self.group_id = group_id or f"colloquy-{stage}"
        self.instance_id = instance_id
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._last_lag = 0.0
        self.error: BaseException | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> StageWorker[M]:
        transactions.start_sweeper(self.cfg)
        self._thread = threading.Thread(target=self._run_guarded, name=f"{self.stage}-worker", daemon=True)
        self._thread.start()
        return self

    def wait_ready(self, timeout: float = 30.0) -> bool:
        """True once the consumer has its partitions assigned (tests wait for this)."""
        return self._ready.wait(timeout)

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the batch in hand, commit it, and close: used on SIGTERM."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run_guarded(self) -> None:
        try:
            self.run()
        except BaseException as exc:  # surfaced to the service so it can exit non-zero
            self.error = exc
            log.exception("stage worker crashed", extra={"stage": self.stage})

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> None:
        client = f"{self.stage}-{self.instance_id}"
        # Static membership (KIP-345): a restarted instance with the same id takes its partitions
        # back at once, without waiting for the session timeout or a group-wide rebalance.
        consumer = make_consumer(self.cfg, self.group_id, client, *self.topics,
                                 group_instance_id=f"{self.stage}-{self.instance_id}")
        producer = self._new_producer(client)
        try:
            while not self._stop.is_set():
                batch = poll_through_outages(consumer, 200, self.stage)
                if not self._ready.is_set() and consumer.assignment():
                    self._ready.set()
                    log.info("partitions assigned", extra={"stage": self.stage,
                                                           "partitions": len(consumer.assignment())})
                self._report_lag(consumer)
                if not batch:
                    continue
                try:
                    self._process_batch(consumer, producer, batch)
                except Exception:
                    log.exception("batch failed; aborting the transaction and redoing it",
                                  extra={"stage": self.stage})
                    producer = self._recover(consumer, producer, batch, client)
        finally:
            consumer.close(autocommit=False)
            producer.close(timeout=10)

    def _new_producer(self, client: str) -> KafkaProducer:
        producer = make_producer(self.cfg, client, transactional_id=f"{self.group_id}-{self.instance_id}")
        producer.init_transactions()
        return producer

    def _process_batch(self, consumer: KafkaConsumer, producer: KafkaProducer,
                       batch: dict[TopicPartition, list[ConsumerRecord]]) -> None:
        producer.begin_transaction()
        offsets: dict[TopicPartition, OffsetAndMetadata] = {}
        produced: list[str] = []
        for tp, records in batch.items():
            for rec in records:
                for out in self._process_record(rec):
                    producer.send(out.topic, key=out.key.encode(), value=out.message.SerializeToString(),
                                  headers=out.headers(), partition=out.partition)
                    produced.append(out.topic)
                offsets[tp] = OffsetAndMetadata(rec.offset + 1, "", -1)
        producer.send_offsets_to_transaction(offsets, consumer.group_metadata())
        producer.commit_transaction()
        for topic in produced:
            metrics.EVENTS_PRODUCED.labels(self.stage, topic).inc()

    def _recover(self, consumer: KafkaConsumer, producer: KafkaProducer,
                 batch: dict[TopicPartition, list[ConsumerRecord]], client: str) -> KafkaProducer:
        """Abort, rewind to the last committed offsets, and hand back a usable producer."""
        try:
            producer.abort_transaction()
        except Exception:
            # A fatal producer error (fenced, broker gone mid-commit): start a fresh producer.
            producer.close(timeout=5)
            producer = None  # type: ignore[assignment]
        for tp in batch:
            try:
                committed = consumer.committed(tp)
            except Exception:
                committed = None
            if committed is None:
                consumer.seek_to_beginning(tp)
            else:
                consumer.seek(tp, committed)
        time.sleep(self.cfg.retry_backoff_ms / 1000)
        while producer is None and not self._stop.is_set():
            try:
                producer = self._new_producer(client)
            except Exception:
                log.warning("producer not ready; retrying", extra={"stage": self.stage})
                time.sleep(1)
        return producer

    def _process_record(self, rec: ConsumerRecord) -> list[events.OutEvent]:
        metrics.EVENTS_CONSUMED.labels(self.stage, rec.topic).inc()
        started = time.perf_counter()
        rid = events.header(rec.headers, events.H_REQUEST_ID)
        token = request_id_var.set(rid)
        try:
            try:
                msg = events.decode(rec.value, rec.headers, self.message_type)
            except events.PoisonEvent as exc:
                return [self._dead_letter(rec, str(exc), "PoisonEvent")]
            consumed = Consumed(
                message=msg, key=rec.key.decode("utf-8", "replace") if rec.key else "",
                event_id=events.header(rec.headers, events.H_EVENT_ID), request_id=rid,
                traceparent=events.header(rec.headers, events.H_TRACE),
                topic=rec.topic, partition=rec.partition, offset=rec.offset,
            )
            for attempt in range(self.cfg.max_retries + 1):
                try:
                    return list(self.handler(consumed))
                except events.PoisonEvent as exc:
                    return [self._dead_letter(rec, str(exc), "PoisonEvent")]
                except Exception as exc:
                    metrics.EVENTS_FAILED.labels(self.stage, rec.topic).inc()
                    if attempt >= self.cfg.max_retries:
                        log.error("giving up on record", extra={"stage": self.stage, "topic": rec.topic,
                                                                "offset": rec.offset, "error": repr(exc)})
                        return [self._dead_letter(rec, f"{type(exc).__name__}: {exc}", type(exc).__name__,
                                                  traceback.format_exc(limit=5))]
                    delay = self.cfg.retry_backoff_ms / 1000 * (2 ** attempt)
                    log.warning("handler failed; retrying", extra={
                        "stage": self.stage, "attempt": attempt + 1, "delay_s": delay, "error": repr(exc)})
                    time.sleep(delay)
            raise AssertionError("unreachable")
        finally:
            request_id_var.reset(token)
            metrics.EVENT_LATENCY.labels(self.stage, rec.topic).observe(time.perf_counter() - started)

    def _dead_letter(self, rec: ConsumerRecord, reason: str, kind: str, trace: str = "") -> events.OutEvent:
        metrics.EVENTS_DEAD_LETTERED.labels(self.stage, rec.topic).inc()
        log.error("dead-lettered a record", extra={"stage": self.stage, "topic": rec.topic,
                                                   "partition": rec.partition, "offset": rec.offset,
                                                   "reason": reason})
        return DeadLetter(rec, self.stage, reason, kind, trace)

    def _report_lag(self, consumer: KafkaConsumer) -> None:
        now = time.monotonic()
        if now - self._last_lag < 5:
            return
        self._last_lag = now
        parts = consumer.assignment()
        if not parts:
            return
        try:
            ends = consumer.end_offsets(list(parts))
            for tp in parts:
                pos = consumer.position(tp)
                metrics.CONSUMER_LAG.labels(self.group_id, tp.topic, str(tp.partition)).set(
                    max(0, ends.get(tp, pos) - pos))
        except Exception:
            log.debug("lag probe failed", exc_info=True)


class DeadLetter(events.OutEvent):
    """The original record, unchanged, on the dead-letter topic with why it landed there."""

    def __init__(self, rec: ConsumerRecord, stage: str, reason: str, kind: str, trace: str) -> None:
        self.topic = DEAD_LETTER.name
        self.key = rec.key.decode("utf-8", "replace") if rec.key else ""
        self.partition = None
        self._value = rec.value or b""
        self._headers = [(k, v) for k, v in (rec.headers or []) if not k.startswith("dlq-")] + [
            ("dlq-reason", reason[:2000].encode()),
            ("dlq-error-type", kind.encode()),
            ("dlq-stage", stage.encode()),
            ("dlq-topic", rec.topic.encode()),
            ("dlq-partition", str(rec.partition).encode()),
            ("dlq-offset", str(rec.offset).encode()),
            ("dlq-trace", trace[-4000:].encode()),
            ("dlq-time-ms", str(int(time.time() * 1000)).encode()),
        ]
        self.message = _RawMessage(self._value)

    def headers(self) -> list[tuple[str, bytes]]:
        return self._headers


class _RawMessage:
    """Duck-typed stand-in for a protobuf message so raw bytes go through the same send path."""

    def __init__(self, value: bytes) -> None:
        self._value = value

    def SerializeToString(self) -> bytes:
        return self._value
