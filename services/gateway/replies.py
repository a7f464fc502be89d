"""Routes this replica's reply topic to the Chat streams waiting on it, and marks it alive.

Each gateway replica reads only `chat.replies.<instance>` (named in every TurnEvent it sends),
so a token never reaches a replica that does not hold its client's stream. A retry with the same
client_request_id on the same replica listens to the same request id: every listener gets every
reply, and one that attaches late first gets what it missed.
"""

from __future__ import annotations

import asyncio
import logging
import time

from colloquy.v1 import events_pb2
from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from services.common import events, kafka_loop, metrics
from services.common.config import KafkaConfig
from services.common.runtime import ThreadWorker
from services.gateway import reply_topics

log = logging.getLogger(__name__)


class ReplyChannel:
    """One request's replies so far, for a listener that attaches late (an idempotent retry).

    Text is cumulative, so the latest text per candidate stands for all earlier ones; a
    retraction (stream-first moderation) follows the text it cuts.
    """

    def __init__(self) -> None:
        self.listeners: list[asyncio.Queue[events_pb2.ReplyEvent]] = []
        self._started: events_pb2.ReplyEvent | None = None
        self._texts: dict[int, events_pb2.ReplyEvent] = {}
        self._notices: list[events_pb2.ReplyEvent] = []
        self._retractions: list[events_pb2.ReplyEvent] = []
        self._final: events_pb2.ReplyEvent | None = None

    def record(self, ev: events_pb2.ReplyEvent) -> None:
        kind = ev.WhichOneof("reply")
        if kind == "started":
            self._started = self._started or ev
        elif kind == "text":
            seen = self._texts.get(ev.text.index)
            if seen is None or len(ev.text.text) > len(seen.text.text):
                self._texts[ev.text.index] = ev
        elif kind == "moderation":
            self._notices.append(ev)
        elif kind == "retraction":
            self._retractions.append(ev)
        elif kind in ("done", "error"):
            self._final = self._final or ev

    def backlog(self) -> list[events_pb2.ReplyEvent]:
        """What a listener attaching now has missed, in an order a stream can replay."""
        out = [self._started] if self._started is not None else []
        out += [self._texts[i] for i in sorted(self._texts)] + self._retractions + self._notices
        return out + ([self._final] if self._final is not None else [])


class ReplyRouter(ThreadWorker):
    """Fans each reply out to every Chat stream listening to its request id.

    Channels are touched only on the event loop's thread (the Kafka thread hands records over
    with call_soon_threadsafe), so registering and delivering never race.
    """

    def __init__(self, kafka: KafkaConfig, topic: str, loop: asyncio.AbstractEventLoop,
                 mark_interval_s: float = 60.0) -> None:
        super().__init__("reply-router")
        self.kafka = kafka
        self.topic = topic
        self.loop = loop
        self.mark_interval_s = mark_interval_s
        self._position: int | None = None
        self._channels: dict[str, ReplyChannel] = {}

    def register(self, request_id: str) -> asyncio.Queue[events_pb2.ReplyEvent]:
        """A queue of this request's replies; a second listener first gets what it missed."""
        q: asyncio.Queue[events_pb2.ReplyEvent] = asyncio.Queue()
        channel = self._channels.get(request_id)
        if channel is None:
            channel = self._channels[request_id] = ReplyChannel()
        else:
            for ev in channel.backlog():
                q.put_nowait(ev)
        channel.listeners.append(q)
        return q

    def unregister(self, request_id: str, queue: asyncio.Queue[events_pb2.ReplyEvent]) -> None:
        channel = self._channels.get(request_id)
        if channel is None:
            return
        if queue in channel.listeners:
            channel.listeners.remove(queue)
        if not channel.listeners:
            del self._channels[request_id]

    def listeners(self, request_id: str) -> int:
        channel = self._channels.get(request_id)
        return len(channel.listeners) if channel is not None else 0

    def run(self) -> None:
        while not self.stopping:
            try:
                self._run()
            except Exception as exc:  # broker restart: reconnect where we left off
                log.warning("reply router failed; reconnecting", extra={"error": repr(exc)})
                time.sleep(0.5)

    def _run(self) -> None:
        # Reads by assignment; the group named after the topic only holds the liveness mark.
        consumer = kafka_loop.make_consumer(self.kafka, self.topic, f"gateway-replies-{self.topic}")
        tp = TopicPartition(self.topic, 0)
        probe = kafka_loop.LagProbe(self.topic, "gateway-replies")
        try:
            consumer.assign([tp])
            if self._position is None:
                consumer.seek_to_end(tp)
                self._position = consumer.position(tp)  # replies older than this replica are not ours
            consumer.seek(tp, self._position)
            next_mark = 0.0
            while not self.stopping:
                if time.monotonic() >= next_mark:
                    self._mark_alive(consumer, tp)
                    next_mark = time.monotonic() + self.mark_interval_s
                self.mark_ready()
                for recs in consumer.poll(timeout_ms=100).values():
                    for rec in recs:
                        self._dispatch(rec)
                self._position = consumer.position(tp)
                if probe.stalled(consumer):
                    return  # `run` reconnects with a new consumer where this one left off
        finally:
            consumer.close()

    def _mark_alive(self, consumer: KafkaConsumer, tp: TopicPartition) -> None:
        """Tell the reply-topic sweep (reply_topics.py) this topic's gateway is alive."""
        try:
            consumer.commit({tp: OffsetAndMetadata(self._position or 0, reply_topics.mark(), -1)})
        except KafkaError as exc:  # not fatal: the sweep allows REPLY_TOPIC_MAX_IDLE_SECONDS
            log.warning("could not mark the reply topic alive", extra={"error": repr(exc)})

    def _dispatch(self, rec) -> None:  # type: ignore[no-untyped-def]
        # The reply path's split (colloquy_stage_seconds{stage="gateway-replies"}): arrival = the
        # stage's send to this poll (its commit and our fetch), loop = the hop onto the event loop.
        polled = time.time()
        arrival_s = max(0.0, polled - rec.timestamp / 1000)
        metrics.STAGE_SECONDS.labels("gateway-replies", "arrival").observe(arrival_s)
        try:
            ev = events.decode(rec.value, rec.headers, events_pb2.ReplyEvent)
        except events.PoisonEvent:
            log.error("undecodable reply record skipped", extra={"offset": rec.offset})
            return
        self.loop.call_soon_threadsafe(self._deliver, ev, polled)

    def _deliver(self, ev: events_pb2.ReplyEvent, polled: float | None = None) -> None:
        if polled is not None:
            metrics.STAGE_SECONDS.labels("gateway-replies", "loop").observe(max(0.0, time.time() - polled))
        channel = self._channels.get(ev.request_id)
        if channel is None:
            return  # nobody listens here (any more): the turn is in the history when it ends
        channel.record(ev)
        for q in channel.listeners:
            q.put_nowait(ev)
