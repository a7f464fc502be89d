"""The consume -> process -> produce loop every pipeline stage runs.

Delivery: each polled batch is processed inside one Kafka transaction that holds the produced
records *and* the consumed offsets (KIP-98/447, supported by kafka-python 3). Downstream
consumers read with `isolation_level=read_committed`, so a stage killed mid-batch leaves no
visible output and its batch is redone: no loss, no duplicate. State kept outside Kafka must
dedupe on the event id itself (`SeenEvents` helps).

Failure: a record that cannot be decoded goes straight to the dead-letter topic; a handler
error is retried with exponential backoff a bounded number of times and then dead-lettered,
with the reason in its headers, while the loop carries on with the next record. So is a record
whose output topic cannot be written (a gone gateway's reply topic, a topic the stage may not
write): a send there would stall the whole transaction, so outputs are checked before sending.

Time: a stage commits what it has done once a batch has run `KAFKA_BATCH_TIME_BUDGET_MS` and
goes on with the rest in the next transaction, so a backlog of expensive records is committed
in parts rather than outlasting the transaction timeout and being redone from its start.

At once: an output marked `at_once` (released answer text, which is cumulative, so a redo may
send it again harmlessly) is sent by a plain idempotent producer as soon as its handler returns,
so it skips the wait for the rest of the batch and the commit; the transaction waits for it and
carries it instead if that send failed.

Latency: one transaction per polled batch, so under load the records waiting (up to
`KAFKA_MAX_POLL_RECORDS`) share one commit, and at low load a lone record is committed at once.
Producers do not linger; consumers fetch with min bytes 1, so the broker answers a fetch as soon
as a committed record is there (`KAFKA_FETCH_MAX_WAIT_MS` only bounds an idle fetch: 10 and 100
ms measured the same hop latency). `colloquy_stage_seconds{stage,part}` splits a stage's time:
arrival (the upstream's send to this poll), process, send, commit.

Beside the path: a stage that produces nothing (the tokenizer by default) runs `ObserverWorker`,
which commits with its consumer instead (its docstring says why).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from typing import Any, Generic, Self, TypeVar

from google.protobuf.message import Message
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka import errors as kafka_errors
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import KafkaError, KafkaTimeoutError
from kafka.producer.future import FutureRecordMetadata
from kafka.structs import OffsetAndMetadata

from services.common import events, metrics, private_api, transactions
from services.common.config import KafkaConfig
from services.common.log import request_id_var
from services.common.runtime import ThreadWorker
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
# Called once per polled batch, before its handlers, with the batch's decodable messages: a stage
# does there what is cheaper for many records at once (score every text in one call, one history
# wait for all conversations) and keeps the results for its handler. An optimization only: the
# handler must still be right for a record `prepare` skipped or failed on.
Prepare = Callable[[list[M]], None]


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
        # at restart with the same id, or after this timeout. A stage's transaction spans only
        # its sends and commit (StageWorker), so 20 s instead of 60 s bounds that stall when a
        # replica is not coming back.
        kwargs["transaction_timeout_ms"] = cfg.transaction_timeout_ms
    return KafkaProducer(**kwargs)


def send_event(producer: KafkaProducer, out: events.OutEvent) -> FutureRecordMetadata:
    """Hand one event (key, serialized message, headers, partition) to the producer; no wait."""
    return producer.send(out.topic, key=out.key.encode(), value=out.message.SerializeToString(),
                         headers=out.headers(), partition=out.partition)


def acked(future: FutureRecordMetadata) -> asyncio.Future[None]:
    """The asyncio side of a kafka-python send future, on the running loop: resolved when the
    broker acknowledged the record, failed with the send's error.

    Why a bridge: kafka-python completes its futures on the producer's I/O thread, where an
    asyncio future must not be touched; the callbacks hop over with call_soon_threadsafe."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def settle(exc: BaseException | None) -> None:
        if done.done():
            return
        if exc is None:
            done.set_result(None)
        else:
            done.set_exception(exc)

    future.add_callback(lambda _meta: loop.call_soon_threadsafe(settle, None))
    future.add_errback(lambda exc: loop.call_soon_threadsafe(settle, exc))
    return done


async def publish(producer: KafkaProducer, out: events.OutEvent, timeout: float) -> None:
    """Send one event and wait (at most `timeout` seconds) for the broker's acknowledgement."""
    await asyncio.wait_for(acked(send_event(producer, out)), timeout)


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


def close_now(producer: KafkaProducer, timeout: float = 0) -> None:
    """Close a producer whose sends will never complete (or that gets `timeout` s to finish them).

    kafka-python's `close` flushes first and raises when a send is incomplete, before it stops
    its sender thread, which would then retry forever; this does what `close` does next.
    """
    try:
        producer.close(timeout=timeout)
    except KafkaError:
        private_api.force_close_producer(producer)


GONE_TOPICS_CHECK_S = 10.0  # how often a stage asks whether its producers track a deleted topic


def tracks_gone_topics(producer: KafkaProducer, who: str) -> bool:
    """Whether `producer` tracks a topic the broker no longer has; such a producer is replaced.

    Why: kafka-python never forgets a topic it has produced to. After a gateway goes away and its
    reply topic is deleted, every producer that wrote to it refreshes metadata every retry backoff
    and its sender thread spins, for good (62% of a core in an idle tokenizer stage); a new
    producer costs one InitProducerId.
    """
    gone = private_api.gone_topics(producer)
    if gone:
        log.info("replacing a producer that still tracks deleted topics", extra={"stage": who, "topics": sorted(gone)})
    return bool(gone)


def close_leaving_group(consumer: KafkaConsumer) -> None:
    """Close a consumer (no offset commit: callers commit their own) and leave its group at once.

    The stages are static members of their groups (KIP-345, `group_instance_id` = stage and
    INSTANCE_ID): a replica that crashes and comes back within the session timeout (10 s) takes
    its partitions back without a rebalance. kafka-python never sends LeaveGroup for a static
    member, so a replica that stops for good (scale-down, SIGTERM) would keep its partitions,
    unread, for the whole session timeout: the rebalance bench measured a 7-8 s stall per SIGTERM.
    A graceful close therefore leaves (LeaveGroup v3+ with the instance id, via private_api):
    scale-down costs one prompt rebalance; a rolling restart costs two (leave, then join) where a
    replica back within 10 s would have cost none, and one that takes longer (a StatefulSet pod
    rescheduled, a stage loading its model) would have stalled its partitions for 10 s anyway.
    A crash (SIGKILL, OOM) sends nothing: its partitions still wait out the session timeout.
    """
    if consumer.config.get("group_instance_id") and not private_api.leave_group_on_close(consumer):
        log.warning("this kafka-python cannot make a static member leave its group on close; its partitions "
                    "move after the session timeout", extra={"group": consumer.config.get("group_id")})
    consumer.close(autocommit=False)


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


UNWRITABLE_TOPIC = "UnwritableTopic"  # dlq-error-type of a record whose output topic cannot be written
# Topic-level metadata errors that no retry will clear.
_UNWRITABLE_CODES = {kafka_errors.UnknownTopicOrPartitionError.errno, kafka_errors.TopicAuthorizationFailedError.errno,
                     kafka_errors.InvalidTopicError.errno}


class OutputTopics:
    """Asks the broker which output topics can be written, before a stage sends to them.

    Why: kafka-python's transactional producer stalls the whole transaction on one bad topic. A
    topic that does not exist blocks `send` for `max_block_ms` and then raises; one deleted after
    the producer cached its metadata never completes (AddPartitionsToTxn is retried forever, and
    commit and abort wait on it). A topic found writable is trusted for `output_check_ttl_ms`.

    Refresh ahead: a background thread asks again, every half of that, about the topics used in
    the last `REFRESH_IDLE_S`, so a stage whose records come more than a TTL apart (every stage
    but output moderation at one chat) does not wait for the broker's answer inside each
    transaction (1.73 ms of a 6.47 ms send p50, `bench.kafka_hop --gap-ms 1300`). Nothing is
    trusted for longer than before: an answer counts from when it was asked, and a topic found
    unwritable is asked about again, in the transaction, which dead-letters its record with the
    broker's reason.
    """

    REFRESH_IDLE_S = 30.0  # topics not used for this long are no longer refreshed

    def __init__(self, kafka: KafkaConfig, client_id: str) -> None:
        self._kafka = kafka
        self._client_id = client_id
        self._admin: KafkaAdminClient | None = None
        self._ok_until: dict[str, float] = {}
        self._used: dict[str, float] = {}
        self._ttl_s = kafka.output_check_ttl_ms / 1000
        self._closed = threading.Event()
        self._refresher: threading.Thread | None = None

    def unwritable(self, topics: Iterable[str], *, fresh: bool = False) -> dict[str, str]:
        """The topics among `topics` that cannot be written, each with the broker's reason.

        Raises when the broker cannot be asked (the caller treats it as a failed batch).
        """
        now = time.monotonic()
        wanted = set(topics)
        if self._ttl_s > 0:  # only the refresher reads (and prunes) this
            for topic in wanted:
                self._used[topic] = now
        ask = sorted(t for t in wanted if fresh or self._ok_until.get(t, 0.0) <= now)
        if not ask:
            return {}
        if self._admin is None:
            self._admin = self._new_admin()
        try:
            described = self._admin.describe_topics(ask)
        except Exception:
            self.close_admin()
            raise
        bad = self._record(described, now)
        if self._refresher is None and self._ttl_s > 0 and not self._closed.is_set():
            self._refresher = threading.Thread(target=self._refresh, name=f"{self._client_id}-refresh",
                                               daemon=True)
            self._refresher.start()
        return bad

    def _new_admin(self) -> KafkaAdminClient:
        return KafkaAdminClient(**self._kafka.client_kwargs(), client_id=self._client_id)

    def _record(self, described: list[dict[str, Any]], asked_at: float) -> dict[str, str]:
        """Trust the writable topics until `asked_at` + TTL; return the others with the reason."""
        bad: dict[str, str] = {}
        for topic in described:
            name, code = topic["name"], topic["error_code"]
            ops = topic.get("authorized_operations") or []
            if code in _UNWRITABLE_CODES:
                bad[name] = kafka_errors.for_code(code).__name__
            elif ops and "WRITE" not in ops:
                bad[name] = "no WRITE permission"
            elif code == 0:
                self._ok_until[name] = asked_at + self._ttl_s
        for name in bad:
            self._ok_until.pop(name, None)
        return bad

    def _refresh(self) -> None:
        """Ask again about recently used topics every half TTL, on a client of its own."""
        admin: KafkaAdminClient | None = None
        try:
            while not self._closed.wait(self._ttl_s / 2):
                now = time.monotonic()
                for topic, used in list(self._used.items()):
                    if now - used > self.REFRESH_IDLE_S:
                        self._used.pop(topic, None)
                recent = sorted(self._used)
                if not recent:
                    continue
                try:
                    admin = admin or self._new_admin()
                    self._record(admin.describe_topics(recent), now)
                except Exception:  # the transaction asks itself, as without this thread
                    log.debug("refreshing output topics failed", exc_info=True)
                    if admin is not None:
                        admin.close()
                    admin = None
        finally:
            if admin is not None:
                admin.close()

    def trusted(self, topic: str) -> bool:
        """Whether `topic` would be sent to without asking the broker first."""
        return self._ok_until.get(topic, 0.0) > time.monotonic()

    def forget(self, topics: Iterable[str] | None = None) -> None:
        """Ask the broker again next time about `topics` (default: all), after a failed batch."""
        if topics is None:
            self._ok_until.clear()
        for topic in topics or ():
            self._ok_until.pop(topic, None)

    def close_admin(self) -> None:
        if self._admin is not None:
            self._admin.close()
            self._admin = None

    def close(self) -> None:
        self._closed.set()
        self.close_admin()
        if self._refresher is not None:
            self._refresher.join(timeout=5)


class _SendsStuck(Exception):
    """Sends of a transaction did not complete; the producer must be replaced (abort would hang)."""

    def __init__(self, topics: set[str]) -> None:
        super().__init__(f"sends to {sorted(topics)} did not complete")
        self.topics = topics


Done = list[tuple[ConsumerRecord, list[events.OutEvent]]]


class GroupReader(ThreadWorker, Generic[M]):
    """What every stage loop does with its consumer: read `topics` as a static member of
    `group_id`, become ready once it holds partitions, replace a consumer that stopped reading."""

    def __init__(self, stage: str, topics: list[str], message_type: type[M], kafka: KafkaConfig, *,
                 group_id: str | None, instance_id: str, thread_name: str = "",
                 consumer_overrides: dict[str, Any] | None = None) -> None:
        super().__init__(thread_name or f"{stage}-worker")
        self.stage = stage
        self.topics = topics
        for topic in topics:  # zero from the start: dashboards and alerts see 0, not "no data"
            metrics.EVENTS_FAILED.labels(stage, topic)
            metrics.EVENTS_DEAD_LETTERED.labels(stage, topic)
        self.message_type = message_type
        self.cfg = kafka
        self.group_id = group_id or f"colloquy-{stage}"
        self.instance_id = instance_id
        self.client = f"{stage}-{instance_id}"
        self._consumer_overrides = consumer_overrides or {}
        self._probe = LagProbe(self.group_id, stage)

    def _new_consumer(self) -> KafkaConsumer:
        # Static membership (KIP-345): an instance restarted after a crash with the same id takes
        # its partitions back at once, without a rebalance; a graceful stop leaves the group
        # (`close_leaving_group` says why).
        return make_consumer(self.cfg, self.group_id, self.client, *self.topics,
                             group_instance_id=f"{self.stage}-{self.instance_id}", **self._consumer_overrides)

    def _poll(self, consumer: KafkaConsumer) -> tuple[KafkaConsumer, dict[TopicPartition, list[ConsumerRecord]]]:
        """One poll; the consumer to go on with (a new one, and no records, when the probe found
        this one stalled: a batch in hand is read again by the new one)."""
        batch = poll_through_outages(consumer, 200, self.stage)
        if not self.is_ready and consumer.assignment():
            self.mark_ready()
            log.info("partitions assigned", extra={"stage": self.stage, "partitions": len(consumer.assignment())})
        if self._probe.stalled(consumer):
            close_leaving_group(consumer)
            return self._new_consumer(), {}
        return consumer, batch


class ObserverWorker(GroupReader[M]):
    """Reads `topics` beside the turn's path and hands each message to `observe`; produces nothing
    (the tokenizer stage by default: it only counts).

    Not a StageWorker: with no output a transaction buys nothing and costs the broker a
    transactional producer's requests for every batch. The consumer commits a batch's offsets once
    it is observed, so a crash observes part of a batch again (at least once: a metric may count
    a few records twice). A record that cannot be decoded, or whose `observe` raises, is skipped
    (logged, `colloquy_events_failed_total`): the stage that owns the topic dead-letters it, and a
    second copy on the dead-letter topic would report one bad record as two."""

    def __init__(self, stage: str, topics: list[str], message_type: type[M], observe: Callable[[M], None],
                 kafka: KafkaConfig, *, group_id: str | None = None, instance_id: str) -> None:
        super().__init__(stage, topics, message_type, kafka, group_id=group_id, instance_id=instance_id)
        self.observe = observe

    def run(self) -> None:
        consumer = self._new_consumer()
        try:
            while not self.stopping:
                consumer, batch = self._poll(consumer)
                if not batch:
                    continue
                for recs in batch.values():
                    for rec in recs:
                        self._observe(rec)
                offsets = {tp: OffsetAndMetadata(recs[-1].offset + 1, "", -1) for tp, recs in batch.items()}
                try:
                    consumer.commit(offsets)
                except KafkaError as exc:  # a rebalance took the partitions: their next owner observes them again
                    log.warning("offset commit failed", extra={"stage": self.stage, "error": repr(exc)})
        finally:
            close_leaving_group(consumer)

    def _observe(self, rec: ConsumerRecord) -> None:
        metrics.EVENTS_CONSUMED.labels(self.stage, rec.topic).inc()
        try:
            self.observe(events.decode(rec.value, rec.headers, self.message_type))
        except Exception as exc:
            metrics.EVENTS_FAILED.labels(self.stage, rec.topic).inc()
            log.warning("skipped a record it could not observe", extra={
                "stage": self.stage, "topic": rec.topic, "partition": rec.partition, "offset": rec.offset,
                "error": repr(exc)})


class StageWorker(GroupReader[M]):
    """Runs one stage: consume `topics` as `group_id`, call `handler`, produce its events.

    Ready once the consumer has partitions assigned; `stop` finishes and commits the batch in
    hand (or its part within the time budget) and closes, as on SIGTERM."""

    def __init__(
        self,
        stage: str,
        topics: list[str],
        message_type: type[M],
        handler: Handler[M],
        kafka: KafkaConfig,
        *,
        group_id: str | None = None,
        instance_id: str,
        prepare: Prepare[M] | None = None,
    ) -> None:
        super().__init__(stage, topics, message_type, kafka, group_id=group_id, instance_id=instance_id)
        self.handler = handler
        self.prepare = prepare
        self._outputs = OutputTopics(kafka, f"{stage}-{instance_id}-topics")
        # Records whose output the broker refused for good (not retriable), by (topic, partition,
        # offset): dead-lettered when the batch is redone instead of failing it again.
        self._refused: dict[tuple[str, int, int], tuple[str, str]] = {}
        self._at_once: KafkaProducer | None = None  # made on the first `at_once` output
        self._topics_checked = time.monotonic()
        self._sent_at_once: dict[int, FutureRecordMetadata] = {}  # id(out) -> its send, this batch
        metrics.BATCHES_CUT.labels(stage)

    def start(self) -> Self:
        transactions.start_sweeper(self.cfg)
        return super().start()

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> None:
        client = self.client  # the producers' client id too
        consumer = self._new_consumer()
        producer = self._new_producer(client)
        try:
            while not self.stopping:
                consumer, batch = self._poll(consumer)
                if time.monotonic() - self._topics_checked >= GONE_TOPICS_CHECK_S:
                    producer = self._drop_gone_topics(producer, client)
                if not batch:
                    continue
                now_ms, arrival = time.time() * 1000, metrics.STAGE_SECONDS.labels(self.stage, "arrival")
                for recs in batch.values():
                    for rec in recs:  # CreateTime: the upstream producer's send, on this machine's clock
                        arrival.observe(max(0.0, now_ms - rec.timestamp) / 1000)
                try:
                    self._process_batch(consumer, producer, batch)
                except _SendsStuck as exc:
                    # On the redo a topic found unwritable, or an output refused for good, sends
                    # its record to the dead-letter topic. Otherwise (a slow broker) the batch is
                    # simply redone, like any failed one.
                    self._outputs.forget(exc.topics)
                    log.error("sends did not complete or were refused; replacing the producer and redoing the batch",
                              extra={"stage": self.stage, "topics": sorted(exc.topics)})
                    producer = self._recover(consumer, producer, batch, client, discard=True)
                except Exception:
                    log.exception("batch failed; aborting the transaction and redoing it",
                                  extra={"stage": self.stage})
                    self._outputs.forget()  # e.g. a send that timed out on a topic deleted since its check
                    producer = self._recover(consumer, producer, batch, client)
        finally:
            self._outputs.close()
            close_leaving_group(consumer)
            producer.close(timeout=10)
            if self._at_once is not None:
                self._at_once.close(timeout=10)

    def _drop_gone_topics(self, producer: KafkaProducer, client: str) -> KafkaProducer:
        """Between transactions: replace a producer (and the at-once one) that tracks a deleted topic."""
        self._topics_checked = time.monotonic()
        if self._at_once is not None and tracks_gone_topics(self._at_once, f"{self.stage} at-once"):
            close_now(self._at_once, timeout=5)  # a send stuck on the deleted topic is dropped
            self._at_once = None  # made again on the next `at_once` output
        if not tracks_gone_topics(producer, self.stage):
            return producer
        close_now(producer, timeout=5)
        return self._new_producer(client)

    def _new_producer(self, client: str) -> KafkaProducer:
        producer = make_producer(self.cfg, client, transactional_id=f"{self.group_id}-{self.instance_id}")
        producer.init_transactions()
        return producer

    def _process_batch(self, consumer: KafkaConsumer, producer: KafkaProducer,
                       batch: dict[TopicPartition, list[ConsumerRecord]]) -> None:
        """Handle the batch, committing in parts: one transaction per `batch_budget_s` of work.

        Handlers run before the transaction's sends, so the broker-side transaction lasts only
        the sends and the commit; the budget bounds how much work a failure redoes and how long
        the other conversations on these partitions wait for their outputs.
        """
        budget = self.cfg.batch_budget_s
        self._sent_at_once.clear()  # a part left uncommitted by a stop: whoever redoes it sends again
        records = [rec for recs in batch.values() for rec in recs]
        started = time.monotonic()
        done: Done = []
        process = metrics.STAGE_SECONDS.labels(self.stage, "process")
        self._prepare(records)
        for i, rec in enumerate(records):
            done.append((rec, self._process_record(rec)))
            self._send_at_once(done[-1][1])
            if i + 1 < len(records) and time.monotonic() - started >= budget:
                process.observe(time.monotonic() - started)
                self._commit(consumer, producer, done)
                metrics.BATCHES_CUT.labels(self.stage).inc()
                log.info("batch over its time budget: committed a part", extra={
                    "stage": self.stage, "records": len(done), "left": len(records) - i - 1,
                    "budget_s": budget})
                done, started = [], time.monotonic()
                if self.stopping:
                    return  # the rest is not committed: whoever owns the partitions next redoes it
        if done:
            process.observe(time.monotonic() - started)
            self._commit(consumer, producer, done)

    def _prepare(self, records: list[ConsumerRecord]) -> None:
        """Hand the batch's decodable messages to `prepare` (a poison record is left to its
        handler's dead-lettering; a failing `prepare` only costs the handlers its head start)."""
        if self.prepare is None:
            return
        messages = []
        for rec in records:
            with contextlib.suppress(events.PoisonEvent):
                messages.append(events.decode(rec.value, rec.headers, self.message_type))
        try:
            self.prepare(messages)
        except Exception:
            log.warning("preparing the batch failed; its handlers work unprepared", exc_info=True,
                        extra={"stage": self.stage})

    def _send_at_once(self, outs: list[events.OutEvent]) -> None:
        """Send a record's `at_once` outputs now, outside the transaction, where the topic can be
        written (otherwise the transaction handles them: it dead-letters the record)."""
        eager = [out for out in outs if out.at_once]
        if not eager:
            return
        try:
            bad = self._outputs.unwritable(out.topic for out in eager)
            if self._at_once is None:
                self._at_once = make_producer(self.cfg, f"{self.stage}-{self.instance_id}-at-once")
            for out in eager:
                if out.topic not in bad:
                    self._sent_at_once[id(out)] = send_event(self._at_once, out)
        except Exception:  # the transaction sends what did not go out here
            log.warning("an at-once send failed; the transaction carries it", exc_info=True,
                        extra={"stage": self.stage})

    def _drop_sent_at_once(self, done: Done) -> Done:
        """`done` without the `at_once` outputs whose early send the broker acknowledged."""
        if not self._sent_at_once:
            return done
        with contextlib.suppress(KafkaTimeoutError):  # sent while the batch ran: normally complete
            self._at_once.flush(timeout=self.cfg.transaction_timeout_ms / 4000)  # type: ignore[union-attr]
        kept: Done = []
        for rec, outs in done:
            rest = []
            for out in outs:
                future = self._sent_at_once.pop(id(out), None)
                if future is not None and future.is_done and not future.failed():
                    metrics.EVENTS_PRODUCED.labels(self.stage, out.topic).inc()
                else:
                    rest.append(out)
            kept.append((rec, rest))
        self._sent_at_once.clear()
        return kept

    def _commit(self, consumer: KafkaConsumer, producer: KafkaProducer, done: Done) -> None:
        """One transaction: the outputs of `done` and its offsets. A record whose outputs need a
        topic that cannot be written is dead-lettered instead, alone."""
        started = time.perf_counter()
        done = self._drop_sent_at_once(done)
        bad = self._outputs.unwritable(out.topic for _, outs in done for out in outs)
        if bad or self._refused:
            done = [(rec, self._route_unwritable(rec, outs, bad)) for rec, outs in done]
        producer.begin_transaction()
        offsets: dict[TopicPartition, OffsetAndMetadata] = {}
        sent: list[tuple[ConsumerRecord, str, Any]] = []
        for rec, outs in done:
            for out in outs:
                sent.append((rec, out.topic, send_event(producer, out)))
            offsets[TopicPartition(rec.topic, rec.partition)] = OffsetAndMetadata(rec.offset + 1, "", -1)
        with contextlib.suppress(KafkaTimeoutError):  # sends take milliseconds; this bounds one that never ends
            producer.flush(timeout=self.cfg.transaction_timeout_ms / 4000)
        stuck = set()
        for rec, topic, future in sent:
            if not future.is_done or future.failed():
                stuck.add(topic)
            if future.is_done and future.failed() and not getattr(future.exception, "retriable", False):
                self._refused[(rec.topic, rec.partition, rec.offset)] = (
                    f"the broker refused its output to {topic!r}: {future.exception}",
                    type(future.exception).__name__)
        if stuck:
            raise _SendsStuck(stuck)
        for rec, _ in done:
            self._refused.pop((rec.topic, rec.partition, rec.offset), None)
        flushed = time.perf_counter()
        producer.send_offsets_to_transaction(offsets, consumer.group_metadata())
        producer.commit_transaction()
        metrics.STAGE_SECONDS.labels(self.stage, "send").observe(flushed - started)
        metrics.STAGE_SECONDS.labels(self.stage, "commit").observe(time.perf_counter() - flushed)
        metrics.STAGE_BATCH_RECORDS.labels(self.stage).observe(len(done))
        for _, topic, _ in sent:
            metrics.EVENTS_PRODUCED.labels(self.stage, topic).inc()

    def _route_unwritable(self, rec: ConsumerRecord, outs: list[events.OutEvent],
                          bad: dict[str, str]) -> list[events.OutEvent]:
        """`outs` as they are, or only a dead letter when one of them needs an unwritable topic or
        the broker refused one for good on an earlier try (none of the record's outputs are sent:
        a record's outputs go out together or not at all, but for `at_once` ones already sent)."""
        refused = self._refused.get((rec.topic, rec.partition, rec.offset))
        if refused:
            return [self._dead_letter(rec, *refused)]
        for out in outs:
            if out.topic in bad:
                return [self._dead_letter(rec, f"output topic {out.topic!r} cannot be written: {bad[out.topic]}",
                                          UNWRITABLE_TOPIC)]
        return outs

    def _recover(self, consumer: KafkaConsumer, producer: KafkaProducer,
                 batch: dict[TopicPartition, list[ConsumerRecord]], client: str,
                 *, discard: bool = False) -> KafkaProducer:
        """Abort, rewind to the last committed offsets, and hand back a usable producer.

        `discard`: close the producer without aborting (its abort would wait on sends that never
        complete); the next producer's init_transactions aborts the open transaction.
        """
        if discard:
            close_now(producer)
            producer = None  # type: ignore[assignment]
        else:
            try:
                producer.abort_transaction()
            except Exception:
                # A fatal producer error (fenced, broker gone mid-commit): start a fresh producer.
                close_now(producer)
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
        while producer is None and not self.stopping:
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


PROBE_S = 5.0  # how often a loop reports its lag and looks for a stall
STALL_PROBES = 4  # probes in a row with lag and no progress (~20 s) before the consumer is replaced
# Probes in a row outside its group (~60 s): a rebalance legitimately waits up to a session timeout
# (10 s) for a dead static member, and for every live member to poll again.
OUT_OF_GROUP_PROBES = 12


class LagProbe:
    """Every PROBE_S: each assigned partition's lag (the gauge), and whether the consumer has
    stopped reading, which kafka-python 3.0.12 can do without raising anything.

    Seen under CPU contention on a loaded broker: partitions assigned, records waiting, no
    FetchRequest ever sent again (generation; the conversation materializer, positions at 0 for
    4 minutes; the feedback sink, a rating not written in 90 s), and a member that lost its group
    on a failed commit (UnknownMemberId) and never joined again (moderation, after a SIGSTOP). No
    upstream fix exists in the newest release, so the loops watch for it: records waiting on the
    partitions the loop has not paused and not one position moving over STALL_PROBES probes in a
    row, or a member outside its group for OUT_OF_GROUP_PROBES probes, and the loop replaces its
    consumer (leaves the group, joins with a new one, which reads on from the committed offsets).
    """

    def __init__(self, group_id: str | None, stage: str, *, every_s: float = PROBE_S,
                 stall_probes: int = STALL_PROBES, out_of_group_probes: int = OUT_OF_GROUP_PROBES) -> None:
        self.group = group_id or ""
        self.stage = stage
        self.every_s = every_s
        self.stall_probes = stall_probes
        self.out_of_group_probes = out_of_group_probes
        for reason in ("no_progress", "out_of_group"):  # exported at 0 from the start
            metrics.CONSUMERS_REPLACED.labels(stage, reason)
        self.reset()

    def reset(self) -> None:
        """Start over (a new consumer)."""
        self._last = time.monotonic()
        self._positions: dict[TopicPartition, int] = {}
        self._stuck = 0
        self._outside = 0

    def stalled(self, consumer: KafkaConsumer, *, expect_progress: bool = True) -> bool:
        """Probe when one is due; True when the consumer should be replaced (the count then starts
        over). `expect_progress` False: the loop holds back on purpose (its database is down), so
        lag is reported but not held against the consumer. A probe that fails (broker away) counts
        neither way: riding out an outage is poll_through_outages' job."""
        now = time.monotonic()
        if now - self._last < self.every_s:
            return False
        self._last = now
        stuck = self._lag_stuck(consumer)
        if stuck is not None:
            self._stuck = self._stuck + 1 if stuck and expect_progress else 0
        self._outside = self._outside + 1 if self._out_of_group(consumer) else 0
        reason = ("no_progress" if self._stuck >= self.stall_probes else
                  "out_of_group" if self._outside >= self.out_of_group_probes else "")
        if not reason:
            return False
        log.warning("Kafka consumer stopped reading; replacing it",
                    extra={"stage": self.stage, "reason": reason, "probes": max(self._stuck, self._outside),
                           "positions": {f"{tp.topic}:{tp.partition}": o for tp, o in self._positions.items()}})
        metrics.CONSUMERS_REPLACED.labels(self.stage, reason).inc()
        self.reset()
        return True

    def _lag_stuck(self, consumer: KafkaConsumer) -> bool | None:
        """Records waiting and not one position moved since the last probe; None: the probe failed."""
        parts = [tp for tp in consumer.assignment() if tp not in consumer.paused()]
        if not parts:
            self._positions = {}
            return False
        try:
            ends = consumer.end_offsets(parts, timeout_ms=5000)
            positions = {tp: consumer.position(tp, timeout_ms=5000) for tp in parts}
        except Exception:
            log.debug("lag probe failed", exc_info=True)
            return None
        known = {tp: pos for tp, pos in positions.items() if pos is not None}
        lagging = False
        for tp, pos in known.items():
            lag = max(0, ends.get(tp, pos) - pos)
            metrics.CONSUMER_LAG.labels(self.group, tp.topic, str(tp.partition)).set(lag)
            lagging = lagging or lag > 0
        # Stuck: records waiting and no position moved. Not per partition: one poll may serve one
        # partition's backlog before another's (max_poll_records), which is progress.
        stuck = lagging and bool(known) and known == self._positions
        self._positions = known
        return stuck

    @staticmethod
    def _out_of_group(consumer: KafkaConsumer) -> bool:
        if not consumer.config.get("group_id") or consumer.subscription() is None:
            return False  # assigned by hand: no membership to lose
        return private_api.group_member_state(consumer) not in (None, "stable")


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
