"""Routes this replica's reply topic to the Chat streams waiting on it.

Each gateway replica reads only `chat.replies.<instance>` (named in every TurnEvent it sends),
so a token never reaches a replica that does not hold its client's stream.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

from colloquy.v1 import events_pb2
from kafka import TopicPartition

from services.common import events, kafka_loop
from services.common.config import KafkaConfig

log = logging.getLogger(__name__)


class ReplyRouter:
    def __init__(self, kafka: KafkaConfig, topic: str, loop: asyncio.AbstractEventLoop) -> None:
        self.kafka = kafka
        self.topic = topic
        self.loop = loop
        self._queues: dict[str, asyncio.Queue[events_pb2.ReplyEvent]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None

    def register(self, request_id: str) -> asyncio.Queue[events_pb2.ReplyEvent]:
        q: asyncio.Queue[events_pb2.ReplyEvent] = asyncio.Queue()
        with self._lock:
            self._queues[request_id] = q
        return q

    def unregister(self, request_id: str) -> None:
        with self._lock:
            self._queues.pop(request_id, None)

    def start(self) -> ReplyRouter:
        self._thread = threading.Thread(target=self._run_forever, name="reply-router", daemon=True)
        self._thread.start()
        return self

    def wait_ready(self, timeout: float = 30.0) -> bool:
        return self._ready.wait(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run_forever(self) -> None:
        position: int | None = None
        while not self._stop.is_set():
            try:
                position = self._run(position)
            except Exception as exc:  # broker restart: reconnect where we left off
                log.warning("reply router failed; reconnecting", extra={"error": repr(exc)})
                time.sleep(0.5)

    def _run(self, position: int | None) -> int | None:
        consumer = kafka_loop.make_consumer(self.kafka, None, f"gateway-replies-{self.topic}")
        tp = TopicPartition(self.topic, 0)
        try:
            consumer.assign([tp])
            if position is None:
                consumer.seek_to_end(tp)
                position = consumer.position(tp)  # replies older than this replica are not ours
            consumer.seek(tp, position)
            self._ready.set()
            while not self._stop.is_set():
                for recs in consumer.poll(timeout_ms=100).values():
                    for rec in recs:
                        self._dispatch(rec)
                position = consumer.position(tp)
            return position
        finally:
            consumer.close()

    def _dispatch(self, rec) -> None:  # type: ignore[no-untyped-def]
        try:
            ev = events.decode(rec.value, rec.headers, events_pb2.ReplyEvent)
        except events.PoisonEvent:
            log.error("undecodable reply record skipped", extra={"offset": rec.offset})
            return
        with self._lock:
            q = self._queues.get(ev.request_id)
        if q is not None:
            self.loop.call_soon_threadsafe(q.put_nowait, ev)
