"""The generation stage on Kafka: chat.prompts (+ chat.cancels) -> Ray Serve -> generation.progress.

Why this is not `kafka_loop.StageWorker`: that loop handles one record at a time inside one Kafka
transaction per polled batch. Generation does not fit it: one record takes seconds to minutes, so
handling records one after another would block every conversation on the partition behind one
answer; and one record yields many output records *while* it runs, which a transaction would hide
from read_committed consumers until the whole answer was done, defeating streaming. So this loop
runs many requests at once (up to GENERATION_MAX_IN_FLIGHT, then it pauses the prompt partitions),
produces progress with a plain idempotent producer as tokens arrive, and commits a chat.prompts
offset only once every record before it on its partition has produced its final batch (the
per-partition contiguous-completion point, `OffsetTracker`). A crash therefore redelivers every
unfinished request: at-least-once, and harmless because progress carries cumulative text and the
seed is derived from the request id, so the regenerated answer is the same answer.

Cancels: chat.cancels is keyed like chat.prompts and has as many partitions, and both topics are
consumed in one group with the range assignor, so the worker holding a conversation's prompts also
gets its cancels. A cancel cancels the Serve call, which cancels the replica's task and the engine
request within one decode step; the final batch then says CANCELLED. A cancel's offset is committed
with the answer it stopped (or at once when that answer is not running here).

Threads: kafka-python's consumer is not thread-safe, so every consumer call runs on one dedicated
I/O thread; records are handed to the producer on one send thread (in order; `send` can block on
metadata); everything else runs on this worker's asyncio loop (Serve handles, batching).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import logging
import threading
import time
import uuid
from typing import Any

from colloquy.v1 import events_pb2, generation_pb2
from kafka import ConsumerRebalanceListener, TopicPartition
from kafka.errors import KafkaTimeoutError
from kafka.structs import OffsetAndMetadata

from services.common import events, kafka_loop, metrics, private_api, turns
from services.common.config import KafkaConfig
from services.common.log import request_id_var
from services.common.runtime import ThreadWorker
from services.generation import api, engine
from services.generation.config import EngineSettings, WorkerSettings

log = logging.getLogger(__name__)

STAGE = "generation"
POLL_STUCK_S = 10.0  # a poll (bounded by 200 ms) still running after this is stuck
# Generation is on every turn's critical path: a stalled consumer (kafka_loop.LagProbe) is
# replaced after 3 s of lag without progress instead of the other loops' 20 s.
PROBE_S = 1.0
STALL_PROBES = 3
OUT_OF_GROUP_PROBES = 60  # a rebalance may wait out a dead member's 10 s session: a minute, as elsewhere
_EVENT_NS = uuid.UUID("6f0b5f76-3c55-4d0e-9a43-7c1d8d1e6a10")
_UNFINISHED = generation_pb2.FINISH_REASON_UNSPECIFIED


def unanswered(request_id: str, conversation_id: str, code: str, traceparent: str = "") -> events.OutEvent:
    """The TurnUnanswered event that frees a conversation whose turn generation gave up on."""
    return turns.unanswered(request_id, conversation_id, code, STAGE, traceparent,
                            event_id=str(uuid.uuid5(_EVENT_NS, f"{request_id}/unanswered")))


class OffsetTracker:
    """Per-partition commit points under out-of-order completion.

    The commit point of a partition is its lowest offset still in flight, or one past the highest
    offset seen when none is: everything before it has produced its final output.

    A rebalance revokes every partition and then assigns the new set (the eager protocol).
    kafka-python 3 keeps the fetch position of a partition the new assignment still holds
    (`SubscriptionState.assign_from_subscribed`), so its records are not read again: its commit
    point must survive the rebalance, or what finished around it is never committed and an answer
    still running could be passed by a later record's commit. `revoke` therefore holds the state
    aside (completions still count against it) and `assign` takes back what the new assignment
    keeps; the rest is dropped, so completions after a move commit nothing for the next owner.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()  # the rebalance listener runs on the Kafka I/O thread
        self._inflight: dict[TopicPartition, set[int]] = {}
        self._next: dict[TopicPartition, int] = {}
        self._committed: dict[TopicPartition, int] = {}
        self._held: dict[TopicPartition, tuple[set[int], int, int | None]] = {}  # revoked, not yet reassigned

    def started(self, tp: TopicPartition, offset: int) -> None:
        with self._lock:
            self._inflight.setdefault(tp, set()).add(offset)
            self._next[tp] = max(self._next.get(tp, 0), offset + 1)

    def finished(self, tp: TopicPartition, offset: int) -> None:
        with self._lock:
            if tp in self._inflight:
                self._inflight[tp].discard(offset)
            if tp in self._held:
                self._held[tp][0].discard(offset)

    def point(self, tp: TopicPartition) -> int | None:
        with self._lock:
            return self._point(tp)

    def _point(self, tp: TopicPartition) -> int | None:
        if tp not in self._next:
            return None
        inflight = self._inflight.get(tp)
        return min(inflight) if inflight else self._next[tp]

    def to_commit(self, only: set[TopicPartition] | None = None) -> dict[TopicPartition, int]:
        """Partitions whose commit point moved since the last `committed()`."""
        out = {}
        with self._lock:
            for tp in list(self._next):
                if only is not None and tp not in only:
                    continue
                p = self._point(tp)
                if p is not None and p != self._committed.get(tp):
                    out[tp] = p
        return out

    def committed(self, points: dict[TopicPartition, int]) -> None:
        with self._lock:
            self._committed.update({tp: o for tp, o in points.items() if tp in self._next})

    def revoke(self, tps: set[TopicPartition]) -> None:
        """A rebalance took `tps`: nothing is committed for them until `assign` gives them back."""
        with self._lock:
            for tp in tps:
                if tp in self._next:
                    self._held[tp] = (self._inflight.pop(tp, set()), self._next.pop(tp),
                                      self._committed.pop(tp, None))

    def assign(self, tps: set[TopicPartition]) -> None:
        """The rebalance's new assignment: held partitions it keeps resume where they were."""
        with self._lock:
            for tp in set(self._held) & tps:
                inflight, nxt, committed = self._held[tp]
                self._inflight[tp], self._next[tp] = inflight, nxt
                if committed is not None:
                    self._committed[tp] = committed
            self._held.clear()

    def clear(self) -> None:
        """Drop everything (the consumer closed): a successor reads on from the committed offsets."""
        with self._lock:
            for state in (self._inflight, self._next, self._committed, self._held):
                state.clear()


@dataclasses.dataclass
class _Flight:
    """One request being generated (possibly delivered more than once)."""

    turn: events_pb2.TurnEvent
    request_id: str
    traceparent: str
    offsets: list[tuple[TopicPartition, int]]
    response: Any = None
    cancelled: bool = False
    task: asyncio.Task[None] | None = None
    last_send: Any = None  # kafka future of the last record produced for this request


class _Progress:
    """Cumulative text per candidate and the batching rule for GenerationProgress records."""

    def __init__(self, turn: events_pb2.TurnEvent, n: int, batch_tokens: int, batch_s: float) -> None:
        self.turn = turn
        self.light_turn = events_pb2.TurnEvent()
        self.light_turn.CopyFrom(turn)
        self.light_turn.ClearField("prompt")
        self.texts = [""] * n
        self.tokens = [0] * n
        self.finish = [_UNFINISHED] * n
        self.published = [0] * n  # cumulative text length already sent (a retry must catch up first)
        self.seq = 0
        self.pending = 0
        self.last_flush = time.monotonic()
        self.model_version = ""
        self.prompt_tokens = 0
        self.first_token_unix_ms = 0
        self.batch_tokens = batch_tokens
        self.batch_s = batch_s

    def restart(self) -> None:
        """A retried stream starts over; what was published stays published."""
        self.texts = [""] * len(self.texts)
        self.tokens = [0] * len(self.tokens)
        self.finish = [_UNFINISHED] * len(self.finish)
        self.pending = 0

    def apply(self, deltas: list[engine.Delta]) -> None:
        for d in deltas:
            self.texts[d.index] += d.text
            self.tokens[d.index] = d.completion_tokens
            self.pending += d.tokens
            if d.tokens and not self.first_token_unix_ms:
                self.first_token_unix_ms = turns.now_ms()
            if d.finish_reason is not None:
                self.finish[d.index] = api.FINISH[d.finish_reason]

    def caught_up(self) -> bool:
        return all(len(t) >= p or f != _UNFINISHED
                   for t, p, f in zip(self.texts, self.published, self.finish, strict=True))

    def due(self) -> bool:
        """Time for a batch: the first token, every `batch_tokens` tokens, or `batch_ms` after the last."""
        if not self.pending or not self.caught_up():
            return False
        return (self.seq == 0 or self.pending >= self.batch_tokens
                or time.monotonic() - self.last_flush >= self.batch_s)

    def wait_s(self) -> float | None:
        """How long until a pending partial batch is due (None: nothing pending)."""
        if not self.pending or not self.caught_up():
            return None
        return max(0.0, self.batch_s - (time.monotonic() - self.last_flush))

    def message(self, done: bool) -> events_pb2.GenerationProgress:
        msg = events_pb2.GenerationProgress(
            # The prompt travels on the first batch and the last (output moderation records it
            # with the turn, for feedback), not on every batch in between.
            turn=self.turn if self.seq == 0 or done else self.light_turn, done=done,
            model_version=self.model_version, seq=self.seq, prompt_tokens=self.prompt_tokens,
            first_token_unix_ms=self.first_token_unix_ms)
        for i, text in enumerate(self.texts):
            msg.candidates.add(index=i, text=text, tokens=self.tokens[i], finish_reason=self.finish[i])
        self.seq += 1
        self.pending = 0
        self.last_flush = time.monotonic()
        self.published = [max(p, len(t)) for p, t in zip(self.published, self.texts, strict=True)]
        return msg


class GenerationWorker(ThreadWorker):
    """Consumes prompts and cancels, streams answers from the Serve deployment, produces progress.

    Ready once it holds partitions. `stop` stops taking prompts, lets in-flight answers finish
    for `grace_s`, commits and closes. A failed send sets `error` from the loop (the producer is
    broken): the loop then exits and redelivery redoes the unfinished work."""

    def __init__(self, kafka: KafkaConfig, settings: WorkerSettings, handle: Any,
                 engine_settings: EngineSettings | None, instance_id: str) -> None:
        super().__init__("generation-worker")
        self.kafka = kafka
        self.cfg = settings
        self.handle = handle
        self.limits = engine_settings or EngineSettings()
        self.instance_id = instance_id
        self._io = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="generation-kafka")
        # One thread keeps the records of a request in the order they were produced.
        self._send_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="generation-send")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._consumer: Any = None
        self._producer: Any = None
        self._tracker = OffsetTracker()
        self._flights: dict[str, _Flight] = {}
        self._cancelled: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._side_tasks: set[asyncio.Task[None]] = set()
        self._last_commit = 0.0
        self._topics_checked = time.monotonic()
        self._stuck_polls = 0
        self._lag_probe = kafka_loop.LagProbe(self.cfg.group_id, STAGE, every_s=PROBE_S, stall_probes=STALL_PROBES,
                                              out_of_group_probes=OUT_OF_GROUP_PROBES)
        self.grace_s = 20.0

    # -- lifecycle (ThreadWorker) ----------------------------------------------------------------
    def run(self) -> None:
        try:
            asyncio.run(self._main())
        finally:
            self._io.shutdown(wait=False)
            self._send_pool.shutdown(wait=False)

    async def _call(self, fn: Any, *args: Any) -> Any:
        """Run a consumer call on the single Kafka I/O thread."""
        assert self._loop is not None
        return await self._loop.run_in_executor(self._io, fn, *args)

    # -- main loop -------------------------------------------------------------------------------
    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        client = f"{STAGE}-{self.instance_id}"
        self._producer = kafka_loop.make_producer(self.kafka, client)
        self._consumer = await self._call(self._make_consumer, client)
        try:
            while not self.stopping:
                batch = await self._poll_guarded()
                for records in batch.values():
                    for rec in records:
                        self._dispatch(rec)
                await self._maybe_commit()
                if self.error is not None:
                    raise self.error
                if await self._call(self._lag_probe.stalled, self._consumer):
                    await self._replace_consumer(client)
                if not self._flights and time.monotonic() - self._topics_checked >= kafka_loop.GONE_TOPICS_CHECK_S:
                    await self._drop_gone_topics(client)
            await self._drain()
        finally:
            await self._call(self._close_consumer)
            self._producer.close(timeout=10)

    async def _drop_gone_topics(self, client: str) -> None:
        """With no answer streaming (a stream's records stay on one producer, in order): replace
        the producer if it tracks a deleted topic (`kafka_loop.tracks_gone_topics` says why)."""
        self._topics_checked = time.monotonic()
        if kafka_loop.tracks_gone_topics(self._producer, STAGE):
            old, self._producer = self._producer, kafka_loop.make_producer(self.kafka, client)
            # On the send thread, after any send handed to the old producer before the swap.
            await asyncio.get_running_loop().run_in_executor(self._send_pool, kafka_loop.close_now, old, 5)

    async def _poll_guarded(self) -> dict[TopicPartition, list[Any]]:
        """Poll, with a watchdog: kafka-python 3.0.12 can lose the cross-thread wakeup of a
        consumer call (seen under CPU contention: poll() blocked forever on its internal Event
        while its I/O thread idled). A poll bounded by 200 ms that has not returned after
        POLL_STUCK_S is stuck; fail its waiter so the loop goes on, and give up (exit, so the
        supervisor restarts us) if that keeps happening."""
        assert self._loop is not None
        fut = self._loop.run_in_executor(self._io, self._poll)
        try:
            return await asyncio.wait_for(asyncio.shield(fut), POLL_STUCK_S)
        except TimeoutError:
            pass
        self._stuck_polls += 1
        log.warning("Kafka poll stuck; unblocking it", extra={"stage": STAGE, "times": self._stuck_polls})
        if self._stuck_polls > 3:
            raise RuntimeError("the Kafka consumer keeps getting stuck; restarting the service")
        private_api.fail_pending_waiters(self._consumer, KafkaTimeoutError("poll watchdog: lost wakeup"))
        try:
            return await asyncio.wait_for(fut, POLL_STUCK_S)
        except KafkaTimeoutError:
            return {}

    def _make_consumer(self, client: str) -> Any:
        consumer = kafka_loop.make_consumer(self.kafka, self.cfg.group_id, client)
        topics = [self.cfg.topic_in, self.cfg.topic_cancels]
        # Know the topics before joining the group: an assignment made without their metadata is
        # empty and is only redone at the next metadata refresh (minutes).
        deadline = time.monotonic() + 30
        while not all(consumer.partitions_for_topic(t) for t in topics) and time.monotonic() < deadline:
            time.sleep(0.2)
        consumer.subscribe(topics, listener=_Rebalance(self))
        return consumer

    def _close_consumer(self) -> None:
        self._commit_sync(self._tracker.to_commit())
        kafka_loop.close_leaving_group(self._consumer)
        self._tracker.clear()  # a new consumer starts from the committed offsets, not these positions

    async def _replace_consumer(self, client: str) -> None:
        """Leave the group with the stuck consumer and join with a new one (in-flight requests go
        on; a record redelivered to us meanwhile attaches to its running request)."""
        await self._call(self._close_consumer)  # commits what is done; the rest is forgotten
        self._consumer = await self._call(self._make_consumer, client)

    def _poll(self) -> dict[TopicPartition, list[Any]]:
        """One poll on the I/O thread; pauses prompt partitions while at the in-flight limit."""
        consumer = self._consumer
        full = len(self._flights) >= self.cfg.max_in_flight
        if full:  # every poll: a rebalance hands out partitions unpaused
            consumer.pause(*[tp for tp in consumer.assignment() if tp.topic == self.cfg.topic_in])
        elif consumer.paused():
            consumer.resume(*consumer.paused())
        # Records return at once; 200 ms bounds idle waits.
        batch = kafka_loop.poll_through_outages(consumer, 200, STAGE)
        if not self.is_ready and consumer.assignment():
            self.mark_ready()
            log.info("partitions assigned", extra={"stage": STAGE, "partitions": len(consumer.assignment())})
        return batch

    async def _maybe_commit(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_commit < 0.1:
            return
        self._last_commit = now
        points = self._tracker.to_commit()
        if points:
            await self._call(self._commit_sync, points)

    def _commit_sync(self, points: dict[TopicPartition, int]) -> None:
        if not points:
            return
        try:
            self._consumer.commit({tp: OffsetAndMetadata(o, "", -1) for tp, o in points.items()})
            self._tracker.committed(points)
        except Exception as exc:  # rebalance in progress: the next owner redoes these records
            log.warning("offset commit failed", extra={"stage": STAGE, "error": repr(exc)})

    async def _drain(self) -> None:
        deadline = time.monotonic() + self.grace_s
        while self._flights and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            await self._maybe_commit()
        for flight in list(self._flights.values()):  # unfinished: redelivered to the next owner
            if flight.task is not None:
                flight.task.cancel()
        await self._maybe_commit(force=True)

    # -- records ---------------------------------------------------------------------------------
    def _dispatch(self, rec: Any) -> None:
        tp = TopicPartition(rec.topic, rec.partition)
        metrics.EVENTS_CONSUMED.labels(STAGE, rec.topic).inc()
        self._tracker.started(tp, rec.offset)
        if rec.topic == self.cfg.topic_cancels:
            self._on_cancel(rec, tp)
            return
        try:
            turn = events.decode(rec.value, rec.headers, events_pb2.TurnEvent)
        except events.PoisonEvent as exc:
            self._dead_letter(rec, tp, str(exc))
            return
        existing = self._flights.get(turn.request_id)
        if existing is not None:  # redelivered while still running here: finish both together
            existing.offsets.append((tp, rec.offset))
            return
        flight = _Flight(turn=turn, request_id=turn.request_id, offsets=[(tp, rec.offset)],
                         traceparent=events.header(rec.headers, events.H_TRACE))
        self._flights[turn.request_id] = flight
        flight.task = asyncio.get_running_loop().create_task(self._run_flight(flight))

    def _on_cancel(self, rec: Any, tp: TopicPartition) -> None:
        """Stop the request a cancel names. Its offset is committed with the cancelled answer when
        that answer is running here (a crash redelivers both), else at once: a cancel for a prompt
        not seen yet is only remembered in memory, which a restart loses (the gateway's deadline
        still ends that turn)."""
        try:
            msg = events.decode(rec.value, rec.headers, events_pb2.CancelEvent)
        except events.PoisonEvent as exc:
            self._dead_letter(rec, tp, str(exc))
            return
        flight = self._flights.get(msg.request_id)
        if flight is None:  # the prompt may come later (topics are not ordered with each other)
            self._cancelled[msg.request_id] = None
            while len(self._cancelled) > 10_000:
                self._cancelled.popitem(last=False)
            self._tracker.finished(tp, rec.offset)
            return
        log.info("cancelling", extra={"stage": STAGE, "request_id": msg.request_id, "reason": msg.reason})
        flight.offsets.append((tp, rec.offset))
        flight.cancelled = True
        if flight.response is not None:
            flight.response.cancel()

    def _dead_letter(self, rec: Any, tp: TopicPartition, reason: str) -> None:
        """Dead-letter an undecodable record; its offset counts as done once the broker has it."""
        metrics.EVENTS_DEAD_LETTERED.labels(STAGE, rec.topic).inc()
        log.error("dead-lettered a record", extra={"stage": STAGE, "topic": rec.topic, "partition": rec.partition,
                                                   "offset": rec.offset, "reason": reason})

        key = rec.key.decode("utf-8", "replace") if rec.key else ""
        request_id = events.header(rec.headers, events.H_REQUEST_ID)

        async def send() -> None:
            try:
                if rec.topic == self.cfg.topic_in and key and request_id:  # a turn nobody will answer
                    await self._acked(await self._send(unanswered(request_id, key, "DEAD_LETTERED")))
                await self._acked(await self._send(kafka_loop.DeadLetter(rec, STAGE, reason, "PoisonEvent", "")))
            except Exception as exc:
                self.error = exc  # the producer is broken: exit and let redelivery redo it
                return
            self._tracker.finished(tp, rec.offset)

        task = asyncio.get_running_loop().create_task(send())
        self._side_tasks.add(task)  # asyncio keeps only weak references to tasks
        task.add_done_callback(self._side_tasks.discard)

    async def _run_flight(self, flight: _Flight) -> None:
        token = request_id_var.set(flight.request_id)
        try:
            await self._generate(flight)
            if flight.last_send is not None:  # acknowledged before its offset may be committed
                await self._acked(flight.last_send)
        except asyncio.CancelledError:
            return  # shutting down: not committed, so the next owner regenerates it
        except Exception as exc:
            log.exception("generation stage failed", extra={"stage": STAGE})
            self.error = exc  # the producer is broken: exit and let redelivery redo the work
            return
        finally:
            request_id_var.reset(token)
            if self._flights.get(flight.request_id) is flight:
                del self._flights[flight.request_id]
        for tp, offset in flight.offsets:
            self._tracker.finished(tp, offset)

    async def _generate(self, flight: _Flight) -> None:
        turn = flight.turn
        if turns.deadline_passed(turn):
            await self._refuse(flight, turns.deadline_error(turn, STAGE, flight.traceparent))
            return
        try:
            req = api.turn_request(turn, max_tokens_limit=self.limits.max_tokens_limit,
                                   max_n=self.limits.max_n)
        except api.InvalidArgument as exc:
            await self._refuse(flight, turns.reply_error(turn, "INVALID_ARGUMENT", str(exc), STAGE,
                                                        flight.traceparent))
            return
        progress = _Progress(turn, req.sampling.n, self.cfg.batch_tokens, self.cfg.batch_ms / 1000)
        if flight.request_id in self._cancelled or flight.cancelled:
            progress.finish = [generation_pb2.FINISH_REASON_CANCELLED] * req.sampling.n
            await self._publish(flight, progress, done=True)
            return
        for attempt in range(self.cfg.retries + 1):
            try:
                status = await self._stream(flight, req, progress)
            except _StreamBroken as exc:
                if flight.cancelled or attempt >= self.cfg.retries:
                    await self._fail(flight, progress, "UNAVAILABLE", f"generation stream broke: {exc.cause!r}")
                    return
                log.warning("generation stream broke; regenerating", extra={
                    "stage": STAGE, "attempt": attempt + 1, "error": repr(exc.cause)})
                progress.restart()
                await asyncio.sleep(0.2 * (attempt + 1))
                continue
            if status is not None:
                code, message = status
                if code == "DEADLINE_EXCEEDED":
                    await self._refuse(flight, turns.deadline_error(turn, STAGE, flight.traceparent))
                else:
                    await self._refuse(flight, turns.reply_error(turn, code, message, STAGE, flight.traceparent))
            return

    async def _stream(self, flight: _Flight, req: engine.Request,
                      progress: _Progress) -> tuple[str, str] | None:
        """Stream one attempt into progress batches; a (code, message) when refused before starting."""
        from ray.serve.exceptions import BackPressureError, RequestCancelledError

        queue: asyncio.Queue[Any] = asyncio.Queue()
        done = object()

        async def pump() -> None:
            try:
                async for item in flight.response:
                    queue.put_nowait(item)
                queue.put_nowait(done)
            except BaseException as exc:
                queue.put_nowait(exc)

        flight.response = self.handle.options(
            stream=True, session_id=req.conversation_id or req.request_id, method_name="stream",
        ).remote(req)
        if flight.cancelled:
            flight.response.cancel()
        pumper = asyncio.get_running_loop().create_task(pump())
        try:
            while True:
                wait = progress.wait_s()
                try:
                    if not queue.empty():
                        item = queue.get_nowait()
                    elif wait is None:
                        item = await queue.get()
                    else:
                        item = await asyncio.wait_for(queue.get(), wait)
                except TimeoutError:
                    if progress.due():
                        await self._publish(flight, progress, done=False)
                    continue
                if item is done:
                    break
                if isinstance(item, RequestCancelledError) or (
                        isinstance(item, BaseException) and flight.cancelled):
                    progress.finish = [f if f != _UNFINISHED else generation_pb2.FINISH_REASON_CANCELLED
                                       for f in progress.finish]
                    break
                if isinstance(item, BackPressureError):
                    return "RESOURCE_EXHAUSTED", f"generation is at capacity: {item}"
                if isinstance(item, BaseException):
                    raise _StreamBroken(item)
                if isinstance(item, dict):  # the status header
                    if item["code"] != "OK":
                        return item["code"], item["message"]
                    progress.model_version = item["model_version"]
                    progress.prompt_tokens = item["prompt_tokens"]
                    continue
                progress.apply(item)
                if progress.due():
                    await self._publish(flight, progress, done=False)
        finally:
            pumper.cancel()
        progress.finish = [f if f != _UNFINISHED else generation_pb2.FINISH_REASON_ERROR for f in progress.finish]
        await self._publish(flight, progress, done=True)
        return None

    # -- output ----------------------------------------------------------------------------------
    async def _publish(self, flight: _Flight, progress: _Progress, done: bool) -> None:
        seq = progress.seq
        msg = progress.message(done)
        flight.last_send = await self._send(events.OutEvent(
            topic=self.cfg.topic_out, key=flight.turn.conversation_id, message=msg,
            request_id=flight.request_id, traceparent=flight.traceparent,
            event_id=str(uuid.uuid5(_EVENT_NS, f"{flight.request_id}/{seq}"))))

    async def _fail(self, flight: _Flight, progress: _Progress, code: str, message: str) -> None:
        """Nothing sent yet: fail the turn at the gateway; else end the answer with ERROR."""
        if progress.seq == 0:
            await self._refuse(flight, turns.reply_error(flight.turn, code, message, STAGE, flight.traceparent))
            return
        progress.finish = [f if f != _UNFINISHED else generation_pb2.FINISH_REASON_ERROR for f in progress.finish]
        await self._publish(flight, progress, done=True)

    async def _refuse(self, flight: _Flight, error: events.OutEvent) -> None:
        """Fail a turn that produced no answer: nothing will record it, so first tell the prompt
        stage to free its conversation (acknowledged before the error goes out, so the client's
        retry finds the conversation free), then send the error to the gateway."""
        code = error.message.error.code
        await self._acked(await self._send(unanswered(flight.request_id, flight.turn.conversation_id, code,
                                                      flight.traceparent)))
        if flight.turn.reply_topic:
            flight.last_send = await self._send(error)

    async def _send(self, out: events.OutEvent) -> Any:
        """Hand a record to the producer on its own thread: `send` blocks while it fetches a new
        topic's metadata, which must not stall every other stream on this loop."""
        fut = await asyncio.get_running_loop().run_in_executor(
            self._send_pool, kafka_loop.send_event, self._producer, out)
        metrics.EVENTS_PRODUCED.labels(STAGE, out.topic).inc()
        return fut

    async def _acked(self, kafka_future: Any) -> None:
        """Await a kafka-python send future. The idempotent producer keeps a partition's records in
        order, so the last record of a request being acknowledged means all of them were."""
        await asyncio.wait_for(kafka_loop.acked(kafka_future), 60)


class _StreamBroken(Exception):
    def __init__(self, cause: BaseException) -> None:
        super().__init__(repr(cause))
        self.cause = cause


class _Rebalance(ConsumerRebalanceListener):
    """Carry the commit points across a rebalance (`OffsetTracker.revoke` / `assign` say why).

    No commit here: kafka-python 3 runs listeners on its own I/O thread, where a blocking commit
    is refused. A partition that moves away may have had completions since the last periodic
    commit (every 100 ms): the next owner redoes them, which is harmless (same seed, cumulative text).
    """

    def __init__(self, worker: GenerationWorker) -> None:
        self.worker = worker

    def on_partitions_revoked(self, revoked: Any) -> None:
        self.worker._tracker.revoke(set(revoked))

    def on_partitions_assigned(self, assigned: Any) -> None:
        self.worker._tracker.assign(set(assigned))
        log.info("partitions assigned", extra={"stage": STAGE, "count": len(assigned)})
