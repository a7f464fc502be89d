"""The shared process runtime: the replica id rule, the thread-worker base, the send bridge."""

from __future__ import annotations

import asyncio
import inspect
import re
import socket
import threading
import time
from pathlib import Path

import pytest
from colloquy.v1 import events_pb2
from kafka.future import Future

from services.common import config, events, kafka_loop, runtime
from services.common.config import KafkaConfig
from services.conversation.reader import StoreReader
from services.conversation.retention import RetentionSweeper
from services.conversation.worker import Materializer
from services.feedback.worker import FeedbackSink
from services.gateway.replies import ReplyRouter
from services.generation.worker import GenerationWorker
from tests.common.kafka_util import create, read_all

ROOT = Path(__file__).resolve().parents[2]


def _instance(env: dict[str, str]) -> str:
    return config.load(config.ServerConfig, env).instance()


def test_instance_id_without_INSTANCE_ID_is_unique_per_replica_and_stable_across_restarts() -> None:
    host = socket.gethostname()
    # Two replicas on one host listen on two ports: two ids (not "0" for both, which fenced).
    assert _instance({"GRPC_PORT": "50053"}) != _instance({"GRPC_PORT": "50063"})
    # A restart listens on its port again: the same id, so the same reply topic and txn ids.
    assert _instance({"GRPC_PORT": "50053"}) == _instance({"GRPC_PORT": "50053"}) == f"{host}-50053"
    assert _instance({"GRPC_PORT": "0", "METRICS_PORT": "9105"}) == f"{host}-9105"  # generation: no gRPC
    assert _instance({"GRPC_PORT": "50053", "INSTANCE_ID": "moderation-2"}) == "moderation-2"
    with pytest.raises(config.ConfigError, match="INSTANCE_ID is required"):
        _instance({"GRPC_PORT": "0", "METRICS_PORT": "0"})  # OS-chosen ports: nothing stable to derive
    with pytest.raises(config.ConfigError, match="INSTANCE_ID='a/b'"):
        _instance({"INSTANCE_ID": "a/b"})  # it becomes part of a topic name


def test_no_service_picks_its_own_replica_id_fallback() -> None:
    """Every service takes its id from `ServerConfig.instance()` (runtime.bootstrap); the
    per-service fallbacks ("0", the hostname, hostname + random) are gone."""
    offenders = []
    for path in sorted((ROOT / "services").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith("services/web/") or rel == "services/common/config.py":
            continue
        text = path.read_text()
        if re.search(r"\binstance_id or\b|\.instance_id\b(?!\s*=)", text.replace("self.instance_id", "")):
            offenders.append(rel)
    assert offenders == []


class _Loop(runtime.ThreadWorker):
    def __init__(self, fail: bool = False) -> None:
        super().__init__("test-loop")
        self.fail = fail
        self.threads: set[int] = set()

    def run(self) -> None:
        self.threads.add(threading.get_ident())
        if self.fail:
            raise RuntimeError("broken")
        self.mark_ready()
        while not self.stopping:
            time.sleep(0.01)


def test_thread_worker_starts_once_is_ready_and_stops() -> None:
    w = _Loop()
    assert w.start() is w and w.start() is w  # a second start (ServiceApp's) is a no-op
    assert w.wait_ready(10) and w.is_ready
    w.stop(10)
    assert w._thread is not None and not w._thread.is_alive()
    assert len(w.threads) == 1 and w.error is None and runtime.first_dead([w]) is None


def test_thread_worker_that_dies_keeps_its_error_and_is_not_waited_for() -> None:
    w = _Loop(fail=True).start()
    started = time.monotonic()
    assert not w.wait_ready(30)
    assert time.monotonic() - started < 5  # not the whole timeout: it is dead
    assert isinstance(w.error, RuntimeError) and runtime.first_dead([_Loop(), w]) is w


@pytest.mark.parametrize("cls", [kafka_loop.StageWorker, ReplyRouter, FeedbackSink, StoreReader,
                                 GenerationWorker, Materializer, RetentionSweeper])
def test_every_background_loop_is_a_thread_worker(cls: type) -> None:
    assert issubclass(cls, runtime.ThreadWorker)
    source = inspect.getsource(cls)
    assert "_guarded" not in vars(cls) and "threading.Thread(" not in source, f"{cls.__name__} runs its own thread"


def test_acked_bridges_a_send_future_completed_on_another_thread() -> None:
    async def main() -> None:
        ok, bad, early = Future(), Future(), Future().success(None)
        threading.Timer(0.05, ok.success, args=(None,)).start()
        threading.Timer(0.05, bad.failure, args=(ValueError("refused"),)).start()
        await asyncio.wait_for(kafka_loop.acked(ok), 5)
        await asyncio.wait_for(kafka_loop.acked(early), 5)  # done before anyone awaited it
        with pytest.raises(ValueError, match="refused"):
            await asyncio.wait_for(kafka_loop.acked(bad), 5)

    asyncio.run(main())


@pytest.mark.kafka
def test_publish_returns_once_the_broker_has_the_event(kafka_bootstrap: str, unique: str) -> None:
    topic = f"t.publish.{unique}"
    create(kafka_bootstrap, topic, partitions=1)
    producer = kafka_loop.make_producer(KafkaConfig(bootstrap_servers=kafka_bootstrap), "test-publish")
    try:
        msg = events_pb2.CancelEvent(request_id=f"r-{unique}", conversation_id="c1", reason="test")
        asyncio.run(kafka_loop.publish(producer, events.OutEvent(topic, "c1", msg), timeout=10))
    finally:
        producer.close(timeout=5)
    [rec] = read_all(kafka_bootstrap, topic, expect=1, settle=0.2)
    assert events.decode(rec.value, rec.headers, events_pb2.CancelEvent) == msg
