"""The Kafka worker's delivery rules on the real broker, with a scripted stand-in for Serve.

The Serve-backed happy paths (progress, cancel, redelivery) are in test_serve.py; here the
deployment's answers are scripted so the failure paths are deterministic: refusal by the engine,
Serve back-pressure, a replica dying mid-stream, out-of-order completion and offset commits.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from colloquy.v1 import common_pb2, events_pb2, generation_pb2
from kafka import KafkaConsumer, TopicPartition
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, RequestCancelledError

from services.common import events, kafka_loop, topics
from services.common.config import KafkaConfig
from services.generation.config import EngineSettings, WorkerSettings
from services.generation.engine import Delta, FinishReason, Request
from services.generation.worker import GenerationWorker
from tests.common import kafka_util

pytestmark = pytest.mark.kafka

Script = Callable[[Request, int], AsyncIterator[Any]]


class FakeResponse:
    """Quacks like Serve's DeploymentResponseGenerator: async-iterable and cancellable."""

    def __init__(self, gen: AsyncIterator[Any]) -> None:
        self._gen = gen
        self._cancelled = asyncio.Event()

    def cancel(self) -> None:
        self._cancelled.set()

    def __aiter__(self) -> FakeResponse:
        return self

    async def __anext__(self) -> Any:
        if self._cancelled.is_set():
            raise RequestCancelledError("cancelled")
        nxt = asyncio.ensure_future(self._gen.__anext__())
        cancel = asyncio.ensure_future(self._cancelled.wait())
        try:
            done, _ = await asyncio.wait({nxt, cancel}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (nxt, cancel):
                task.add_done_callback(lambda t: t.cancelled() or t.exception())  # no "never retrieved"
                if not task.done():
                    task.cancel()
        if nxt not in done:
            raise RequestCancelledError("cancelled")
        return nxt.result()


class FakeHandle:
    """`handle.options(...).remote(req)` runs `script(req, attempt)`; records calls."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self._attempts: dict[str, int] = {}
        self._opts: dict[str, Any] = {}

    def options(self, **opts: Any) -> FakeHandle:
        clone = FakeHandle(self.script)
        clone.calls, clone._attempts, clone._opts = self.calls, self._attempts, opts
        return clone

    def remote(self, req: Request) -> FakeResponse:
        self.calls.append((req.request_id, self._opts))
        attempt = self._attempts.get(req.request_id, 0)
        self._attempts[req.request_id] = attempt + 1
        return FakeResponse(self.script(req, attempt))


def ok(prompt_tokens: int = 7) -> dict[str, Any]:
    return {"code": "OK", "message": "", "prompt_tokens": prompt_tokens, "model_version": "fake-v1"}


def delta(text: str, n_tokens: int, total: int, finish: FinishReason | None = None) -> list[Delta]:
    return [Delta(0, text, n_tokens, finish, "fake-v1", 7, total)]


WORDS = ["alpha ", "beta ", "gamma ", "delta ", "epsilon ", "zeta "]


async def words(req: Request, attempt: int, *, delay: float = 0.0, break_at: int = -1) -> AsyncIterator[Any]:
    """The same words every attempt (as with a seed derived from the request id)."""
    yield ok()
    for i, w in enumerate(WORDS):
        if i == break_at and attempt == 0:
            raise RayActorError()
        await asyncio.sleep(delay)
        last = i == len(WORDS) - 1
        yield delta(w, 1, i + 1, FinishReason.LENGTH if last else None)


class Harness:
    def __init__(self, bootstrap: str, unique: str, script: Script, **settings: Any) -> None:
        self.bootstrap = bootstrap
        self.settings = WorkerSettings(topic_in=f"wp-{unique}", topic_cancels=f"wc-{unique}",
                                       topic_out=f"wo-{unique}", group_id=f"wg-{unique}", **settings)
        self.reply_topic = f"wr-{unique}"
        kafka_util.create(bootstrap, self.settings.topic_in, self.settings.topic_cancels,
                          self.settings.topic_out, self.reply_topic, partitions=1)
        self.handle = FakeHandle(script)
        self.worker = GenerationWorker(KafkaConfig(bootstrap_servers=bootstrap), self.settings, self.handle,
                                       EngineSettings(), instance_id=unique)
        self.worker.grace_s = 5

    def turn(self, **kw: Any) -> events_pb2.TurnEvent:
        return events_pb2.TurnEvent(
            request_id=kw.pop("request_id", uuid.uuid4().hex),
            conversation_id=kw.pop("conversation_id", str(uuid.uuid4())),
            reply_topic=self.reply_topic, prompt="<|im_start|>user\nhi<|im_end|>\n",
            sampling=common_pb2.SamplingParams(max_tokens=50, n=1, temperature=0.7, top_p=1.0), **kw)

    def produce(self, topic: str, *msgs: Any) -> None:
        kafka_util.produce(self.bootstrap, topic, [(m.conversation_id, m) for m in msgs])

    def read(self, topic: str, cls: type, until: Callable[[list[Any]], bool], timeout: float = 30) -> list[Any]:
        consumer = KafkaConsumer(topic, bootstrap_servers=self.bootstrap, group_id=None,
                                 auto_offset_reset="earliest", isolation_level="read_committed",
                                 fetch_max_wait_ms=20)
        items: list[Any] = []
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                for recs in consumer.poll(timeout_ms=100).values():
                    for rec in recs:
                        msg = cls()
                        msg.ParseFromString(rec.value)
                        items.append(msg)
                if until(items):
                    return items
        finally:
            consumer.close()
        raise TimeoutError(f"condition not met; got {items}")

    def committed(self, topic: str = "") -> int:
        c = KafkaConsumer(bootstrap_servers=self.bootstrap, group_id=self.settings.group_id,
                          enable_auto_commit=False)
        try:
            return c.committed(TopicPartition(topic or self.settings.topic_in, 0)) or 0
        finally:
            c.close()

    def wait_committed(self, topic: str, offset: int, timeout: float = 15) -> int:
        deadline = time.monotonic() + timeout
        while (got := self.committed(topic)) != offset and time.monotonic() < deadline:
            time.sleep(0.1)
        return got


@pytest.fixture
def harness(kafka_bootstrap: str, unique: str) -> Iterator[Callable[..., Harness]]:
    made: list[Harness] = []

    def make(script: Script, **settings: Any) -> Harness:
        h = Harness(kafka_bootstrap, unique, script, **settings)
        made.append(h)
        h.worker.start()
        assert h.worker.wait_ready(60)
        return h

    yield make
    for h in made:
        h.worker.stop(30)
        assert h.worker.error is None, h.worker.error


def test_engine_overload_is_resource_exhausted(harness: Callable[..., Harness]) -> None:
    async def refuse(req: Request, attempt: int) -> AsyncIterator[Any]:
        yield {"code": "RESOURCE_EXHAUSTED", "message": "generation is at capacity", "prompt_tokens": 0,
               "model_version": "fake-v1"}

    h = harness(refuse)
    turn = h.turn()
    h.produce(h.settings.topic_in, turn)
    replies = h.read(h.reply_topic, events_pb2.ReplyEvent, lambda xs: len(xs) >= 1)
    assert replies[0].error.code == "RESOURCE_EXHAUSTED" and replies[0].error.stage == "generation"
    assert replies[0].request_id == turn.request_id


def test_serve_backpressure_is_resource_exhausted(harness: Callable[..., Harness]) -> None:
    async def full(req: Request, attempt: int) -> AsyncIterator[Any]:
        raise BackPressureError(num_queued_requests=64, max_queued_requests=64)
        yield  # pragma: no cover - makes this an async generator

    h = harness(full)
    h.produce(h.settings.topic_in, h.turn())
    replies = h.read(h.reply_topic, events_pb2.ReplyEvent, lambda xs: len(xs) >= 1)
    assert replies[0].error.code == "RESOURCE_EXHAUSTED"


def test_replica_dying_mid_stream_is_regenerated_without_going_backwards(
        harness: Callable[..., Harness]) -> None:
    h = harness(lambda req, attempt: words(req, attempt, delay=0.03, break_at=3), batch_tokens=1)
    turn = h.turn()
    h.produce(h.settings.topic_in, turn)
    items = h.read(h.settings.topic_out, events_pb2.GenerationProgress, lambda xs: any(p.done for p in xs))
    texts = [p.candidates[0].text for p in items]
    assert all(b.startswith(a) for a, b in itertools.pairwise(texts)), texts
    assert texts[-1] == "".join(WORDS)
    assert items[-1].candidates[0].finish_reason == generation_pb2.FINISH_REASON_LENGTH
    assert [p.seq for p in items] == list(range(len(items)))
    assert sum(1 for rid, _ in h.handle.calls if rid == turn.request_id) == 2


def test_offsets_commit_only_past_contiguous_finished_requests(harness: Callable[..., Harness]) -> None:
    release = threading.Event()

    async def gated(req: Request, attempt: int) -> AsyncIterator[Any]:
        if req.conversation_id.startswith("slow"):
            while not release.is_set():
                await asyncio.sleep(0.02)
        async for item in words(req, attempt):
            yield item

    h = harness(gated)
    slow = h.turn(conversation_id="slow-" + uuid.uuid4().hex)
    fast = h.turn()
    h.produce(h.settings.topic_in, slow, fast)
    h.read(h.settings.topic_out, events_pb2.GenerationProgress,
           lambda xs: any(p.done and p.turn.request_id == fast.request_id for p in xs))
    time.sleep(0.5)
    assert h.committed() == 0  # the fast one (offset 1) finished, but offset 0 has not
    release.set()
    deadline = time.monotonic() + 10
    while h.committed() != 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert h.committed() == 2
    # Both streams ran at once: the slow one never blocked the partition, and both were routed
    # by conversation (session id) for replica affinity.
    sessions = {opts["session_id"] for _, opts in h.handle.calls}
    assert {slow.conversation_id, fast.conversation_id} <= sessions


def test_cancel_mid_stream_and_cancel_before_prompt(harness: Callable[..., Harness]) -> None:
    h = harness(lambda req, attempt: words(req, attempt, delay=0.5))
    running = h.turn()
    early = h.turn()
    h.produce(h.settings.topic_cancels, events_pb2.CancelEvent(
        request_id=early.request_id, conversation_id=early.conversation_id, reason="client-cancelled"))
    time.sleep(0.5)
    h.produce(h.settings.topic_in, running, early)
    h.read(h.settings.topic_out, events_pb2.GenerationProgress,
           lambda xs: any(p.turn.request_id == running.request_id for p in xs))
    h.produce(h.settings.topic_cancels, events_pb2.CancelEvent(
        request_id=running.request_id, conversation_id=running.conversation_id, reason="client-cancelled"))
    items = h.read(h.settings.topic_out, events_pb2.GenerationProgress,
                   lambda xs: sum(p.done for p in xs) >= 2, timeout=10)
    finals = {p.turn.request_id: p for p in items if p.done}
    for rid in (running.request_id, early.request_id):
        assert finals[rid].candidates[0].finish_reason == generation_pb2.FINISH_REASON_CANCELLED
    assert finals[running.request_id].candidates[0].text.startswith("alpha")
    assert len(finals[running.request_id].candidates[0].text) < len("".join(WORDS))
    assert early.request_id not in {rid for rid, _ in h.handle.calls}  # never generated


def test_cancel_offsets_are_committed_and_a_poison_cancel_is_dead_lettered(
        harness: Callable[..., Harness], kafka_bootstrap: str) -> None:
    """chat.cancels is read in the worker's group: its offsets must advance (else every restart
    replays the topic's day of cancels), and an undecodable cancel goes to the dead-letter topic."""
    h = harness(lambda req, attempt: words(req, attempt, delay=0.5))
    dead = kafka_util.Tail(kafka_bootstrap, topics.DEAD_LETTER.name)
    running, unseen = h.turn(), h.turn()
    h.produce(h.settings.topic_in, running)
    h.read(h.settings.topic_out, events_pb2.GenerationProgress,
           lambda xs: any(p.turn.request_id == running.request_id for p in xs))
    h.produce(h.settings.topic_cancels, events_pb2.CancelEvent(
        request_id=unseen.request_id, conversation_id=unseen.conversation_id, reason="client-cancelled"))
    assert h.wait_committed(h.settings.topic_cancels, 1) == 1, "a cancel for a prompt not seen yet"
    kafka_util.produce(kafka_bootstrap, h.settings.topic_cancels, [(running.conversation_id, b"\x08\xff")])
    assert h.wait_committed(h.settings.topic_cancels, 2) == 2, "a poison cancel"
    h.produce(h.settings.topic_cancels, events_pb2.CancelEvent(
        request_id=running.request_id, conversation_id=running.conversation_id, reason="client-cancelled"))
    items = h.read(h.settings.topic_out, events_pb2.GenerationProgress,
                   lambda xs: any(p.done and p.turn.request_id == running.request_id for p in xs))
    assert items[-1].candidates[0].finish_reason == generation_pb2.FINISH_REASON_CANCELLED
    assert h.wait_committed(h.settings.topic_cancels, 3) == 3, "the cancel of a running answer"
    try:
        [poison] = [r for r in dead.read() if r.key == running.conversation_id.encode()]
    finally:
        dead.close()
    assert dict(poison.headers)["dlq-stage"] == b"generation"
    assert dict(poison.headers)["dlq-topic"] == h.settings.topic_cancels.encode()


def test_turns_generation_gives_up_on_are_announced_unanswered_before_the_error(
        harness: Callable[..., Harness], kafka_bootstrap: str) -> None:
    """A refused turn and a dead-lettered one are never recorded: chat.unanswered tells the prompt
    stage to free their conversations (the refusal's notice is acknowledged before the gateway
    hears of it); an answered turn is not announced."""
    async def script(req: Request, attempt: int) -> AsyncIterator[Any]:
        if req.conversation_id.startswith("busy"):
            yield {"code": "RESOURCE_EXHAUSTED", "message": "generation is at capacity", "prompt_tokens": 0,
                   "model_version": "fake-v1"}
            return
        async for item in words(req, attempt):
            yield item

    h = harness(script)
    tail = kafka_util.Tail(kafka_bootstrap, topics.CHAT_UNANSWERED.name)
    refused, answered = h.turn(conversation_id="busy-" + uuid.uuid4().hex), h.turn()
    invalid = h.turn()
    invalid.sampling.n = 99
    poison_conversation, poison_request = str(uuid.uuid4()), uuid.uuid4().hex
    producer = kafka_loop.make_producer(KafkaConfig(bootstrap_servers=kafka_bootstrap), "test-poison")
    producer.send(h.settings.topic_in, key=poison_conversation.encode(), value=b"\x08\xff",
                  headers=[("event-type", b"colloquy.v1.TurnEvent"), ("request-id", poison_request.encode())])
    producer.flush()
    producer.close()
    h.produce(h.settings.topic_in, refused, answered, invalid)
    replies = h.read(h.reply_topic, events_pb2.ReplyEvent, lambda xs: len(xs) >= 2)
    codes = {r.request_id: r.error.code for r in replies}
    assert codes == {refused.request_id: "RESOURCE_EXHAUSTED", invalid.request_id: "INVALID_ARGUMENT"}
    h.read(h.settings.topic_out, events_pb2.GenerationProgress,
           lambda xs: any(p.done and p.turn.request_id == answered.request_id for p in xs))
    assert h.wait_committed(h.settings.topic_in, 4) == 4
    try:
        notices = [events.decode(r.value, r.headers, events_pb2.TurnUnanswered) for r in tail.read()]
    finally:
        tail.close()
    got = {(n.request_id, n.conversation_id, n.code, n.stage) for n in notices}
    assert got >= {(refused.request_id, refused.conversation_id, "RESOURCE_EXHAUSTED", "generation"),
                   (invalid.request_id, invalid.conversation_id, "INVALID_ARGUMENT", "generation"),
                   (poison_request, poison_conversation, "DEAD_LETTERED", "generation")}
    assert answered.request_id not in {n.request_id for n in notices}


def test_a_producer_that_wrote_to_a_deleted_reply_topic_is_replaced_between_answers(
        harness: Callable[..., Harness], monkeypatch: pytest.MonkeyPatch) -> None:
    """kafka-python never forgets a topic it produced to (see `kafka_loop.tracks_gone_topics`):
    after a gone gateway's reply topic is deleted, the worker's producer would ask the broker
    about it every retry backoff for the worker's whole life. With no answer streaming, the
    worker replaces such a producer, and the next answer goes out on the new one."""
    from kafka import KafkaAdminClient

    from services.common import private_api

    async def refuse_some(req: Request, attempt: int) -> AsyncIterator[Any]:
        if req.conversation_id.startswith("refused"):  # the worker's only writes to a reply topic are errors
            yield {"code": "RESOURCE_EXHAUSTED", "message": "generation is at capacity", "prompt_tokens": 0,
                   "model_version": "fake-v1"}
            return
        async for item in words(req, attempt):
            yield item

    def refused(reply_topic: str) -> events_pb2.TurnEvent:
        turn = h.turn(conversation_id=f"refused-{uuid.uuid4().hex}")
        turn.reply_topic = reply_topic
        h.produce(h.settings.topic_in, turn)
        [reply] = h.read(reply_topic, events_pb2.ReplyEvent, lambda xs: len(xs) >= 1)
        assert reply.error.code == "RESOURCE_EXHAUSTED"
        return turn

    monkeypatch.setattr(kafka_loop, "GONE_TOPICS_CHECK_S", 0.5)
    h = harness(refuse_some)
    gone, later = f"{h.reply_topic}-gone", f"{h.reply_topic}-later"
    kafka_util.create(h.bootstrap, gone, later, partitions=1)
    refused(gone)
    old = h.worker._producer
    admin = KafkaAdminClient(bootstrap_servers=h.bootstrap)
    try:
        kafka_util.delete_and_wait(admin, gone)
    finally:
        admin.close()
    refused(later)  # a send to a topic new to the producer refreshes its metadata: `gone` is missing
    deadline = time.monotonic() + 30
    while h.worker._producer is old and time.monotonic() < deadline:
        time.sleep(0.1)
    assert h.worker._producer is not old, f"still the producer that tracks {private_api.gone_topics(old)}"
    assert gone not in private_api.gone_topics(h.worker._producer)
    answered = h.turn()
    h.produce(h.settings.topic_in, answered)
    progress = h.read(h.settings.topic_out, events_pb2.GenerationProgress,
                      lambda xs: any(p.done and p.turn.request_id == answered.request_id for p in xs))
    assert any(p.done and p.turn.request_id == answered.request_id for p in progress)
