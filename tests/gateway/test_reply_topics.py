"""Reply topics: one per gateway replica, the same across its restarts, deleted once it is gone."""

from __future__ import annotations

import asyncio
import socket
import time
import uuid

import pytest
from kafka import KafkaAdminClient, TopicPartition
from kafka.structs import OffsetAndMetadata

from devtools.procs import Proc, free_port
from services.common import topics
from services.common.config import KafkaConfig
from services.gateway import reply_topics
from services.gateway.replies import ReplyRouter
from services.gateway.reply_topics import ReplyTopicJanitor
from tests.common.kafka_util import create

pytestmark = [pytest.mark.kafka, pytest.mark.usefixtures("conversation_store")]

HOUR_MS = 3600 * 1000


def _marks(admin: KafkaAdminClient, names: list[str]) -> dict[str, int | None]:
    got = admin.list_group_offsets({n: [TopicPartition(n, 0)] for n in names})
    out = {}
    for n in names:
        offset = (got.get(n) or {}).get(TopicPartition(n, 0))
        out[n] = reply_topics.marked_at(offset.metadata if offset is not None else None)
    return out


def _wait_absent(admin: KafkaAdminClient, names: set[str], timeout: float = 30.0) -> set[str]:
    deadline = time.monotonic() + timeout
    while names & set(admin.list_topics()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return names & set(admin.list_topics())


def test_sweep_deletes_the_topics_of_gateways_gone_longer_than_the_max_idle(kafka_bootstrap: str) -> None:
    scope = f"{topics.REPLY_PREFIX}t{uuid.uuid4().hex[:8]}-"
    gone, live, legacy = f"{scope}gone", f"{scope}live", f"{scope}legacy"
    create(kafka_bootstrap, gone, live, legacy, f"{scope}own", partitions=1)
    kafka = KafkaConfig(bootstrap_servers=kafka_bootstrap)
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    now = int(time.time() * 1000)
    try:
        for name, at in ((gone, now - 2 * HOUR_MS), (live, now - 60_000)):
            admin.alter_group_offsets(name, {TopicPartition(name, 0): OffsetAndMetadata(0, reply_topics.mark(at), -1)})
        janitor = ReplyTopicJanitor(kafka, f"{scope}own", max_idle_s=3600, scope=scope)
        assert janitor.sweep(now) == [gone]
        assert _wait_absent(admin, {gone}) == set()
        assert {live, legacy, f"{scope}own"} <= set(admin.list_topics())
        assert _marks(admin, [legacy])[legacy] == now  # a topic nobody marked: its clock starts now
        # An hour on, nobody has marked live or legacy again: both gateways are gone. Never its own.
        assert sorted(janitor.sweep(now + HOUR_MS + 61_000)) == [legacy, live]
        assert _wait_absent(admin, {live, legacy}) == set()
        assert f"{scope}own" in admin.list_topics()
    finally:
        admin.delete_topics([n for n in (gone, live, legacy, f"{scope}own") if n in admin.list_topics()],
                            raise_errors=False)
        admin.close()


def test_a_running_gateway_router_keeps_its_topic_marked_alive(kafka_bootstrap: str, unique: str) -> None:
    topic = f"{topics.REPLY_PREFIX}t{unique}"
    create(kafka_bootstrap, topic, partitions=1)
    kafka = KafkaConfig(bootstrap_servers=kafka_bootstrap)
    router = ReplyRouter(kafka, topic, asyncio.new_event_loop(), mark_interval_s=0.5).start()
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    try:
        assert router.wait_ready(60), router.error
        first = _marks(admin, [topic])[topic]
        assert first is not None and abs(first - time.time() * 1000) < 30_000
        time.sleep(1.5)
        later = _marks(admin, [topic])[topic]
        assert later is not None and later > first  # marked again while it runs
        janitor = ReplyTopicJanitor(kafka, "none", max_idle_s=5, scope=topic)
        assert janitor.sweep() == []  # alive: kept, even with a short max idle
    finally:
        router.stop(10)
        admin.delete_topics([topic], raise_errors=False)
        admin.close()


def test_a_gateway_without_INSTANCE_ID_reuses_its_reply_topic_across_restarts(kafka_bootstrap: str) -> None:
    port = free_port()
    expected = f"{topics.REPLY_PREFIX}{socket.gethostname()}-{port}"
    env = {"KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap, "GRPC_PORT": str(port), "METRICS_PORT": str(free_port()),
           "SHUTDOWN_GRACE_SECONDS": "2"}
    seen = []
    try:
        for _ in range(2):
            proc = Proc("services.gateway", env)
            try:
                proc.wait_for(lambda out: '"msg": "serving"' in out, timeout=120)
                seen.append(next(line for line in proc.output().splitlines() if '"gateway ready"' in line))
            finally:
                proc.kill()
                proc.wait(30)
        assert all(f'"reply_topic": "{expected}"' in line for line in seen), seen
    finally:
        admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
        admin.delete_topics([expected], raise_errors=False)
        admin.delete_groups([expected])
        admin.close()
