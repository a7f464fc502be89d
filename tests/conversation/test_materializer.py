"""The materializer against the real broker and both real databases.

The crash test runs `python -m services.conversation` as a separate process and SIGKILLs it
between a batch's row writes and its commit (CONVERSATION_FAULT_KILL_BEFORE_COMMIT), then
restarts it: every turn is stored exactly once and the restart reads on from the stored offsets.
"""

from __future__ import annotations

import json
import re
import time
import urllib.request
import uuid

import grpc
import pytest
import sqlalchemy as sa
from grpc_health.v1 import health_pb2, health_pb2_grpc

from devtools.procs import Proc
from services.common import events, kafka_loop, topics
from services.common.config import KafkaConfig
from services.common.turns import history_key
from services.conversation.db import ConversationDB, turns
from services.conversation.worker import Materializer
from tests.common.kafka_util import Tail, create, read_to_end
from tests.conversation.records import record

PARTITIONS = 3

pytestmark = pytest.mark.kafka


def _produce(bootstrap: str, topic: str, items: list[tuple[bytes, bytes | None, list]]) -> None:
    """Plain (non-transactional) sends, so offsets are dense: record i of a partition is offset i."""
    producer = kafka_loop.make_producer(KafkaConfig(bootstrap_servers=bootstrap), "conversation-test")
    for key, value, headers in items:
        conv = key.decode().rpartition("/")[0]
        producer.send(topic, key=key, value=value, headers=headers,
                      partition=topics.partition_for(conv, PARTITIONS))
    producer.flush()
    producer.close()


def _turn_items(recs: list) -> list[tuple[bytes, bytes | None, list]]:
    return [(history_key(r.conversation_id, r.turn.index).encode(), r.SerializeToString(),
             events.OutEvent("x", "x", r).headers()) for r in recs]


def _stored_turns(db: ConversationDB) -> list[tuple[str, int, int, int]]:
    with db.engine.connect() as c:
        return [tuple(r) for r in c.execute(sa.select(  # type: ignore[misc]
            turns.c.conversation_id, turns.c.turn_index, turns.c.source_partition, turns.c.source_offset))]


def _env(bootstrap: str, topic: str, group: str, url: str, **extra: str) -> dict[str, str]:
    return {"KAFKA_BOOTSTRAP_SERVERS": bootstrap, "KAFKA_CREATE_TOPICS": "false", "CONVERSATION_TOPIC": topic,
            "CONVERSATION_GROUP_ID": group, "DATABASE_URL": url, "GRPC_PORT": "0", "METRICS_PORT": "0",
            "INSTANCE_ID": group, "KAFKA_MAX_POLL_RECORDS": "10", "CONVERSATION_DB_RETRY_SECONDS": "0.2", **extra}


def _serving_ports(proc: Proc) -> tuple[int, int]:
    proc.wait_for(lambda out: '"msg": "serving"' in out)
    line = next(ln for ln in proc.output().splitlines() if '"msg": "serving"' in ln)
    doc = json.loads(line[line.index("{"):])
    return int(doc["grpc_port"]), int(doc["metrics_port"])


def _health(port: int) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status


def _wait_serving(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while _health(port) != health_pb2.HealthCheckResponse.SERVING:
        assert time.monotonic() < deadline, "never became SERVING"
        time.sleep(0.1)


def _metric(metrics_port: int, series: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    m = re.search(re.escape(series) + r" ([0-9.e+]+)", text)
    return float(m.group(1)) if m else 0.0


def test_a_kill_before_commit_loses_and_doubles_nothing_and_the_restart_resumes_from_stored_offsets(
        kafka_bootstrap: str, db_url: str, unique: str) -> None:
    topic, group = f"test.conversation.turns.{unique}", f"test-conversation-{unique}"
    create(kafka_bootstrap, topic, partitions=PARTITIONS)
    recs = [record(f"conv-{unique}-{c}", "alice", i, f"message {c}.{i}") for c in range(20) for i in (1, 2, 3)]
    _produce(kafka_bootstrap, topic, _turn_items(recs))
    db = ConversationDB(db_url)

    crashed = Proc("services.conversation", _env(kafka_bootstrap, topic, group, db_url,
                                                 CONVERSATION_FAULT_KILL_BEFORE_COMMIT="3"))
    assert crashed.wait(60) == -9, crashed.output()[-3000:]
    assert "fault injection: SIGKILL before commit" in crashed.output()
    stored = db.stored_offsets(group, topic)
    rows = _stored_turns(db)
    # Two batches committed, the third (rows written, not committed) left nothing behind.
    assert 0 < sum(stored.values()) < len(recs)
    assert len(rows) == sum(stored.values())
    assert all(offset < stored[partition] for _, _, partition, offset in rows), "a row without its offset"

    proc = Proc("services.conversation", _env(kafka_bootstrap, topic, group, db_url))
    try:
        grpc_port, metrics_port = _serving_ports(proc)
        _wait_serving(grpc_port)
        rows = _stored_turns(db)
        assert sorted((c, i) for c, i, _, _ in rows) == sorted((r.conversation_id, r.turn.index) for r in recs)
        assert sum(db.stored_offsets(group, topic).values()) == len(recs)
        # The restart read only what was not committed: from the stored offsets, not from 0.
        resumed = {json.loads(ln[ln.index("{"):])["partition"]: json.loads(ln[ln.index("{"):])["offset"]
                   for ln in proc.output().splitlines() if "resuming partition from the stored offset" in ln}
        assert resumed == {p: stored.get(p) for p in range(PARTITIONS)}
        left = len(recs) - sum(stored.values())
        assert _metric(metrics_port, f'colloquy_events_consumed_total{{stage="conversation",topic="{topic}"}}') == left
        assert _metric(metrics_port, 'colloquy_conversation_store_changes_total{outcome="written"}') == left
    finally:
        proc.kill()
        db.close()


def test_the_service_is_not_serving_until_its_database_exists_and_the_backlog_is_stored(
        kafka_bootstrap: str, postgres_server: str, unique: str) -> None:
    import psycopg

    topic, group = f"test.conversation.turns.{unique}", f"test-conversation-{unique}"
    create(kafka_bootstrap, topic, partitions=PARTITIONS)
    recs = [record(f"conv-{unique}-{c}", "bob", i) for c in range(10) for i in (1, 2)]
    _produce(kafka_bootstrap, topic, _turn_items(recs))
    name = f"colloquy_test_late_{unique}"
    url = postgres_server.rsplit("/", 1)[0] + "/" + name
    admin = postgres_server.replace("postgresql+psycopg://", "postgresql://")
    proc = Proc("services.conversation", _env(kafka_bootstrap, topic, group, url))
    try:
        grpc_port, _ = _serving_ports(proc)
        proc.wait_for(lambda out: "migrating the store failed" in out)
        assert _health(grpc_port) == health_pb2.HealthCheckResponse.NOT_SERVING
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        _wait_serving(grpc_port)
        db = ConversationDB(url)
        try:  # SERVING means caught up: the whole backlog is already stored
            assert len(_stored_turns(db)) == len(recs)
        finally:
            db.close()
    finally:
        proc.kill()
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_tombstones_delete_and_unreadable_records_are_dead_lettered_without_stopping(
        kafka_bootstrap: str, db_url: str, unique: str) -> None:
    topic, group = f"test.conversation.turns.{unique}", f"test-conversation-{unique}"
    create(kafka_bootstrap, topic, partitions=PARTITIONS)
    topics.ensure_topics(kafka_bootstrap, [topics.DEAD_LETTER])
    dlq = Tail(kafka_bootstrap, topics.DEAD_LETTER.name)
    a, b = f"conv-a-{uuid.uuid4()}", f"conv-b-{uuid.uuid4()}"
    good = [record(a, "alice", 1), record(a, "alice", 2), record(b, "alice", 1)]
    poison = [
        (history_key(a, 3).encode(), b"not a turn record", [("event-type", b"colloquy.v1.TurnEvent")]),
        (history_key(b, 9).encode(), record(b, "alice", 2).SerializeToString(), []),  # key says turn 9
    ]
    tombstones = [(history_key(a, 2).encode(), None, []), (history_key(b, 1).encode(), None, [])]
    _produce(kafka_bootstrap, topic, _turn_items(good) + poison + tombstones + _turn_items([record(a, "alice", 3)]))
    db = ConversationDB(db_url)
    worker = Materializer(db, KafkaConfig(bootstrap_servers=kafka_bootstrap), topic=topic, group_id=group,
                          instance_id=unique, retry_seconds=0.2).start()
    try:
        assert worker.wait_ready(60), worker.error
        page = db.get_conversation(a, "alice")
        assert page is not None and [t.index for t in page.turns] == [1, 3]
        assert db.get_conversation(b, "alice") is None  # its only turn was tombstoned
        assert [s.conversation_id for s in db.list_conversations("alice").conversations] == [a]
        letters = [r for r in dlq.read(settle=0.5)
                   if events.header(r.headers, "dlq-topic") == topic]
        assert sorted(r.key for r in letters) == sorted(k for k, _, _ in poison)
        assert {events.header(r.headers, "dlq-stage") for r in letters} == {"conversation"}
    finally:
        worker.stop()
        dlq.close()
        db.close()
    assert worker.error is None


def test_a_turn_recorded_after_its_conversation_was_deleted_gets_a_tombstone_too(
        kafka_bootstrap: str, db_url: str, unique: str) -> None:
    """A turn still being answered when its conversation is deleted lands after the deletion's
    tombstones: the store ignores it, and the materializer tombstones its key on the topic."""
    topic, group = f"test.conversation.turns.{unique}", f"test-conversation-{unique}"
    create(kafka_bootstrap, topic, partitions=PARTITIONS)
    conv = f"conv-late-{uuid.uuid4()}"
    deletion = (history_key(conv, 1).encode(), None, [])  # its only turn goes: the conversation is deleted
    _produce(kafka_bootstrap, topic, [*_turn_items([record(conv, "alice", 1)]), deletion,
                                      *_turn_items([record(conv, "alice", 2)])])
    db = ConversationDB(db_url)
    worker = Materializer(db, KafkaConfig(bootstrap_servers=kafka_bootstrap), topic=topic, group_id=group,
                          instance_id=unique, retry_seconds=0.2).start()
    try:
        assert worker.wait_ready(60), worker.error
        assert db.get_conversation(conv, "alice") is None and not db.turn_recorded(conv, 2)
        deadline = time.monotonic() + 30
        while True:
            keys = [(r.key, r.value) for r in read_to_end(kafka_bootstrap, topic)]
            if keys.count((history_key(conv, 2).encode(), None)) == 1:
                break
            assert time.monotonic() < deadline, f"no tombstone for the late turn: {keys}"
            time.sleep(0.2)
    finally:
        worker.stop()
        db.close()
    assert worker.error is None


def _wait_stored(db: ConversationDB, group: str, topic: str, total: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while sum(db.stored_offsets(group, topic).values()) < total:
        assert time.monotonic() < deadline, f"stored {db.stored_offsets(group, topic)}, want {total} in all"
        time.sleep(0.1)


def _assigned(worker: Materializer) -> set[int]:
    consumer = worker._consumer
    return {tp.partition for tp in consumer.assignment()} if consumer is not None else set()


def test_replicas_that_split_and_hand_over_partitions_store_every_turn_once(
        kafka_bootstrap: str, db_url: str, unique: str) -> None:
    topic, group = f"test.conversation.turns.{unique}", f"test-conversation-{unique}"
    create(kafka_bootstrap, topic, partitions=PARTITIONS)
    kafka = KafkaConfig(bootstrap_servers=kafka_bootstrap, max_poll_records=5)
    db = ConversationDB(db_url)
    db.migrate()

    def batch(n: int) -> list:
        return [record(f"conv-{unique}-{n}-{c}", "carol", i) for c in range(10) for i in (1, 2, 3)]

    recs = batch(1)
    a = Materializer(db, kafka, topic=topic, group_id=group, instance_id=f"{unique}-a", retry_seconds=0.2).start()
    b = None
    try:
        _produce(kafka_bootstrap, topic, _turn_items(recs))
        _wait_stored(db, group, topic, len(recs))
        b = Materializer(db, kafka, topic=topic, group_id=group, instance_id=f"{unique}-b", retry_seconds=0.2).start()
        deadline = time.monotonic() + 60
        while not (_assigned(a) and _assigned(b)):  # the group split the partitions between them
            assert time.monotonic() < deadline, (_assigned(a), _assigned(b))
            time.sleep(0.1)
        recs += batch(2)
        _produce(kafka_bootstrap, topic, _turn_items(batch(2)))
        _wait_stored(db, group, topic, len(recs))
        a.stop()  # b takes a's partitions over, from the offsets a stored
        recs += batch(3)
        _produce(kafka_bootstrap, topic, _turn_items(batch(3)))
        _wait_stored(db, group, topic, len(recs))
        assert _assigned(b) == set(range(PARTITIONS))
        rows = _stored_turns(db)
        assert sorted((c, i) for c, i, _, _ in rows) == sorted((r.conversation_id, r.turn.index) for r in recs)
        assert a.error is None and b.error is None
    finally:
        a.stop()
        if b is not None:
            b.stop()
        db.close()


def test_health_drops_to_not_serving_when_the_database_goes_away(
        kafka_bootstrap: str, new_pg_database, unique: str) -> None:  # type: ignore[no-untyped-def]
    import psycopg

    topic, group = f"test.conversation.turns.{unique}", f"test-conversation-{unique}"
    create(kafka_bootstrap, topic, partitions=PARTITIONS)
    url = new_pg_database()
    db = ConversationDB(url)
    worker = Materializer(db, KafkaConfig(bootstrap_servers=kafka_bootstrap), topic=topic, group_id=group,
                          instance_id=unique, retry_seconds=0.2).start()
    try:
        assert worker.wait_ready(60), worker.error
        admin = url.rsplit("/", 1)[0].replace("postgresql+psycopg://", "postgresql://") + "/postgres"
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE "{url.rsplit("/", 1)[1]}" WITH (FORCE)')
        deadline = time.monotonic() + 10
        while worker.ready():
            assert time.monotonic() < deadline, "still ready without its database"
            time.sleep(0.2)
    finally:
        worker.stop()
        db.close()
