"""The readers' side (StoreReader) against the real broker and both real databases: readiness
waits for the schema and for the stored offsets to reach the topic's end, and the read-your-writes
waits see what the materializer stored (offsets are stored here by hand, the way it does)."""

from __future__ import annotations

import time
import uuid

import pytest

from services.common import kafka_loop, topics
from services.common.config import KafkaConfig
from services.common.turns import history_key
from services.conversation import domain
from services.conversation.db import ConversationDB
from services.conversation.reader import StoreReader
from tests.common.kafka_util import create
from tests.conversation.records import record

pytestmark = pytest.mark.kafka


def _wait(check, timeout: float = 30.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_ready_only_when_migrated_and_caught_up_and_waits_see_stored_offsets(
        kafka_bootstrap: str, db_url: str, unique: str) -> None:
    topic, group = f"test.conversation.turns.{unique}", f"test-reader-{unique}"
    create(kafka_bootstrap, topic, partitions=3)
    kafka = KafkaConfig(bootstrap_servers=kafka_bootstrap)
    conv = str(uuid.uuid4())
    part = topics.partition_for(conv, 3)
    producer = kafka_loop.make_producer(kafka, "reader-test")
    rec = record(conv, "alice", 1)
    producer.send(topic, key=history_key(conv, 1).encode(), value=rec.SerializeToString(), partition=part).get(10)
    db = ConversationDB(db_url)
    reader = StoreReader(db, kafka, topic=topic, group_id=group, retry_seconds=0.1).start()
    try:
        time.sleep(1.0)
        assert not reader.is_ready, "ready before the schema exists"
        db.migrate()
        time.sleep(1.0)
        assert not reader.is_ready, "ready while the store lacks a record the topic had at start"
        assert reader.wait_caught_up([part], 0.3) is False
        # What the materializer does for the batch holding the record: rows and offsets at once.
        db.apply(group, topic, [domain.UpsertTurn(rec, part, 0, 1_700_000_000_000)], {part: None}, {part: 1})
        assert _wait(lambda: reader.is_ready), "never ready once caught up"
        assert reader.wait_caught_up([part], 5.0) is True
        # A record written after this call is waited for until its offset is stored too.
        rec2 = record(conv, "alice", 2)
        producer.send(topic, key=history_key(conv, 2).encode(), value=rec2.SerializeToString(),
                      partition=part).get(10)
        assert reader.wait_caught_up([part], 0.3) is False
        db.apply(group, topic, [domain.UpsertTurn(rec2, part, 1, 1_700_000_001_000)], {part: 1}, {part: 2})
        assert reader.wait_caught_up([part], 5.0) is True
    finally:
        producer.close()
        reader.stop()
        db.close()
    assert reader.error is None
