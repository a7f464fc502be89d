"""The shared consume -> process -> produce loop against the real broker."""

from __future__ import annotations

import signal
import threading
import time

import pytest
from colloquy.v1 import common_pb2, events_pb2
from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition

from devtools.procs import Proc, free_port
from services.common import events, kafka_loop, topics
from services.common.config import KafkaConfig
from tests.common.kafka_util import Tail, create, delete_and_wait, produce, read_all

pytestmark = pytest.mark.kafka


def turn(i: int, text: str = "hello") -> events_pb2.TurnEvent:
    return events_pb2.TurnEvent(
        request_id=f"req-{i}", conversation_id=f"conv-{i % 4}", user_id="u1", message=f"{text} {i}",
        sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=16), deadline_unix_ms=123)


def start_stage(bootstrap: str, unique: str, delay: float = 0.0, **env: str) -> Proc:
    proc = Proc("tests.common.sample_stage", {
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap, "STAGE_IN": f"t.in.{unique}", "STAGE_OUT": f"t.out.{unique}",
        "STAGE_GROUP": f"g.{unique}", "STAGE_DELAY_S": str(delay), "KAFKA_RETRY_BACKOFF_MS": "20",
        "KAFKA_MAX_POLL_RECORDS": "10", "INSTANCE_ID": f"stage-{unique}", **env})
    proc.wait_for(lambda out: "partitions assigned" in out, timeout=60)
    return proc


def test_protobuf_event_round_trip(kafka_bootstrap: str, unique: str) -> None:
    topic = f"t.roundtrip.{unique}"
    create(kafka_bootstrap, topic, partitions=1)
    sent = turn(7, "ünïcödé ✓")
    produce(kafka_bootstrap, topic, [("conv-3", sent)])
    [rec] = read_all(kafka_bootstrap, topic, expect=1, settle=0.2)
    got = events.decode(rec.value, rec.headers, events_pb2.TurnEvent)
    assert got == sent
    assert rec.key == b"conv-3"
    assert events.header(rec.headers, "event-type") == "colloquy.v1.TurnEvent"
    assert len(events.header(rec.headers, "event-id")) == 36
    assert events.header(rec.headers, "traceparent").startswith("00-")


def test_wrong_payload_type_is_poison() -> None:
    with pytest.raises(events.PoisonEvent):
        events.decode(b"\xff\xff\xff", [], events_pb2.TurnEvent)
    with pytest.raises(events.PoisonEvent):
        events.decode(b"", [("event-type", b"colloquy.v1.CancelEvent")], events_pb2.TurnEvent)


def test_sigkill_mid_batch_loses_nothing_and_applies_nothing_twice(kafka_bootstrap: str, unique: str) -> None:
    n = 40
    create(kafka_bootstrap, f"t.in.{unique}", f"t.out.{unique}")
    produce(kafka_bootstrap, f"t.in.{unique}", [(f"conv-{i % 4}", turn(i)) for i in range(n)])
    stage = start_stage(kafka_bootstrap, unique, delay=0.05)
    # Kill it while it is inside a batch: some records processed, their transaction not committed.
    stage.wait_for(lambda out: out.count("processed req-") >= 15, timeout=60)
    stage.kill()
    assert stage.output().count("processed req-") < n

    stage2 = start_stage(kafka_bootstrap, unique)
    try:
        records = read_all(kafka_bootstrap, f"t.out.{unique}", expect=n, settle=3.0)
    finally:
        stage2.signal(signal.SIGTERM)
        assert stage2.wait(30) == 0
    ids = [events.decode(r.value, r.headers, events_pb2.TurnEvent).request_id for r in records]
    assert sorted(ids) == sorted(f"req-{i}" for i in range(n)), "lost or duplicated outputs"
    texts = {events.decode(r.value, r.headers, events_pb2.TurnEvent).message for r in records}
    assert "HELLO 0" in texts
    # Per conversation, order is kept.
    by_conv: dict[str, list[int]] = {}
    for r in records:
        ev = events.decode(r.value, r.headers, events_pb2.TurnEvent)
        by_conv.setdefault(ev.conversation_id, []).append(int(ev.request_id.split("-")[1]))
    assert all(v == sorted(v) for v in by_conv.values())


def test_poison_and_failing_messages_go_to_dead_letter_and_flow_continues(
        kafka_bootstrap: str, unique: str) -> None:
    create(kafka_bootstrap, f"t.in.{unique}", f"t.out.{unique}", "colloquy.dead-letter")
    dead_tail = Tail(kafka_bootstrap, "colloquy.dead-letter")  # only what lands from now on
    stage = start_stage(kafka_bootstrap, unique)
    try:
        produce(kafka_bootstrap, f"t.in.{unique}", [
            ("conv-0", turn(0)),
            ("conv-0", b"\x08\x96\x01\xff\xfe garbage"),   # malformed protobuf
            ("conv-0", turn(1, "fail")),                   # handler raises every time
            ("conv-0", turn(2)),
        ])
        out = read_all(kafka_bootstrap, f"t.out.{unique}", expect=2, settle=1.0)
        deadline = time.monotonic() + 60
        dead: list = []
        while time.monotonic() < deadline and len(
                [r for r in dead if events.header(r.headers, "dlq-topic") == f"t.in.{unique}"]) < 2:
            dead = dead_tail.read(settle=0.5)
    finally:
        dead_tail.close()
        stage.signal(signal.SIGTERM)
        assert stage.wait(30) == 0
    assert [events.decode(r.value, r.headers, events_pb2.TurnEvent).request_id for r in out] == \
        ["req-0", "req-2"]
    mine = [r for r in dead if events.header(r.headers, "dlq-topic") == f"t.in.{unique}"]
    assert len(mine) == 2
    poison, failing = mine
    assert events.header(poison.headers, "dlq-error-type") == "PoisonEvent"
    assert "not a valid colloquy.v1.TurnEvent" in events.header(poison.headers, "dlq-reason")
    assert poison.value == b"\x08\x96\x01\xff\xfe garbage"
    assert events.header(failing.headers, "dlq-error-type") == "RuntimeError"
    assert "always fails" in events.header(failing.headers, "dlq-reason")
    assert events.header(failing.headers, "dlq-stage") == "sample"
    # The failing record was retried (max_retries=3 -> 4 attempts) before being dead-lettered.
    assert stage.output().count("handler failed; retrying") == 3


def test_topics_are_created_idempotently(kafka_bootstrap: str) -> None:
    from services.common import topics
    topics.ensure_topics(kafka_bootstrap)
    topics.ensure_topics(kafka_bootstrap)  # a second call (or a concurrent one) is harmless
    from kafka import KafkaAdminClient
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    try:
        names = set(admin.list_topics())
    finally:
        admin.close()
    assert {t.name for t in topics.ALL} <= names


def request_ids(records: list) -> list[str]:
    return [events.decode(r.value, r.headers, events_pb2.TurnEvent).request_id for r in records]


def dead_letters_from(tail: Tail, topic: str, expect: int, timeout: float = 60.0) -> list:
    """The dead-letter records that came from `topic`, once `expect` of them have landed."""
    deadline = time.monotonic() + timeout
    mine: list = []
    while time.monotonic() < deadline and len(mine) < expect:
        mine = [r for r in tail.read(settle=0.5) if events.header(r.headers, "dlq-topic") == topic]
    return mine


def test_record_whose_reply_topic_does_not_exist_is_dead_lettered_alone_and_the_batch_goes_on(
        kafka_bootstrap: str, unique: str) -> None:
    """Before: the send blocked 10 s on metadata, raised, and the whole batch was redone forever."""
    create(kafka_bootstrap, f"t.in.{unique}", f"t.out.{unique}", partitions=1)
    topics.ensure_topics(kafka_bootstrap, [topics.DEAD_LETTER])
    gone = f"{topics.REPLY_PREFIX}gone-{unique}"  # never created; the broker does not auto-create
    produce(kafka_bootstrap, f"t.in.{unique}", [  # one partition, one poll: one batch
        ("conv-0", turn(0)), ("conv-0", turn(1, f"to:{gone}")), ("conv-0", turn(2)), ("conv-0", turn(3))])
    dead_tail = Tail(kafka_bootstrap, topics.DEAD_LETTER.name)
    stage = start_stage(kafka_bootstrap, unique)
    try:
        out = read_all(kafka_bootstrap, f"t.out.{unique}", expect=3, timeout=40, settle=1.0)
        dead = dead_letters_from(dead_tail, f"t.in.{unique}", expect=1)
    finally:
        dead_tail.close()
        stage.signal(signal.SIGTERM)
        assert stage.wait(30) == 0
    assert request_ids(out) == ["req-0", "req-2", "req-3"]
    assert len(dead) == 1
    assert events.decode(dead[0].value, dead[0].headers, events_pb2.TurnEvent).request_id == "req-1"
    assert events.header(dead[0].headers, "dlq-error-type") == "UnwritableTopic"
    reason = events.header(dead[0].headers, "dlq-reason")
    assert gone in reason and "UnknownTopicOrPartition" in reason
    logs = stage.output()
    assert "batch failed" not in logs and "replacing the producer" not in logs
    assert logs.count("processed req-0") == 1, "the batch was redone: the loop spun"


def test_reply_topic_deleted_after_the_stage_wrote_to_it_dead_letters_its_record_and_does_not_stall(
        kafka_bootstrap: str, unique: str) -> None:
    """The producer still has the deleted topic's metadata: before, the transaction's
    AddPartitionsToTxn was retried forever and the commit never returned (the stage hung)."""
    reply = f"{topics.REPLY_PREFIX}gw-{unique}"
    create(kafka_bootstrap, f"t.in.{unique}", f"t.out.{unique}", reply, partitions=1)
    topics.ensure_topics(kafka_bootstrap, [topics.DEAD_LETTER])
    dead_tail = Tail(kafka_bootstrap, topics.DEAD_LETTER.name)
    # Trust a checked topic for 10 minutes, so the stage sends to the deleted topic and must find
    # out from the send itself (the check before sending is the other test).
    stage = start_stage(kafka_bootstrap, unique, KAFKA_OUTPUT_CHECK_TTL_MS="600000")
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    try:
        produce(kafka_bootstrap, f"t.in.{unique}", [("conv-0", turn(0, f"to:{reply}"))])
        assert request_ids(read_all(kafka_bootstrap, reply, expect=1, timeout=30, settle=0.1)) == ["req-0"]
        delete_and_wait(admin, reply)
        produce(kafka_bootstrap, f"t.in.{unique}", [("conv-0", turn(1, f"to:{reply}")), ("conv-0", turn(2))])
        out = read_all(kafka_bootstrap, f"t.out.{unique}", expect=1, timeout=60, settle=1.0)
        dead = dead_letters_from(dead_tail, f"t.in.{unique}", expect=1)
    finally:
        admin.close()
        dead_tail.close()
        stage.signal(signal.SIGTERM)
        assert stage.wait(30) == 0
    assert request_ids(out) == ["req-2"]
    assert [events.decode(r.value, r.headers, events_pb2.TurnEvent).request_id for r in dead] == ["req-1"]
    assert events.header(dead[0].headers, "dlq-error-type") == "UnwritableTopic"
    assert reply in events.header(dead[0].headers, "dlq-reason")


def test_a_producer_that_wrote_to_a_deleted_reply_topic_is_replaced_and_stops_asking_for_it(
        kafka_bootstrap: str, unique: str) -> None:
    """kafka-python never forgets a topic it produced to: after a gateway's reply topic was deleted,
    the next metadata refresh (here: the first send to a new gateway's topic) made the stage's
    producer ask the broker about the old one every retry backoff ("not found in cluster
    metadata", its sender thread spinning) for as long as the stage ran. The stage replaces such
    a producer between transactions, and goes on working."""
    old, new = f"{topics.REPLY_PREFIX}gw-{unique}", f"{topics.REPLY_PREFIX}gw2-{unique}"
    create(kafka_bootstrap, f"t.in.{unique}", f"t.out.{unique}", old, partitions=1)
    stage = start_stage(kafka_bootstrap, unique, KAFKA_RETRY_BACKOFF_MS="100")
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    not_found = f"Topic {old} not found in cluster metadata"
    try:
        produce(kafka_bootstrap, f"t.in.{unique}", [("conv-0", turn(0, f"to:{old}"))])
        assert request_ids(read_all(kafka_bootstrap, old, expect=1, timeout=30, settle=0.1)) == ["req-0"]
        delete_and_wait(admin, old)
        create(kafka_bootstrap, new, partitions=1)
        produce(kafka_bootstrap, f"t.in.{unique}", [("conv-1", turn(1, f"to:{new}"))])
        assert request_ids(read_all(kafka_bootstrap, new, expect=1, timeout=30, settle=0.1)) == ["req-1"]
        replaced = "replacing a producer that still tracks deleted topics"
        stage.wait_for(lambda out: replaced in out and old in out.split(replaced, 1)[1], timeout=60)
        time.sleep(1.0)  # a refresh already in flight when the producer was replaced
        asked = stage.output().count(not_found)
        time.sleep(3.0)  # 30 retry backoffs: the old producer would have asked about 30 times more
        assert stage.output().count(not_found) == asked
        produce(kafka_bootstrap, f"t.in.{unique}", [("conv-2", turn(2))])
        out = read_all(kafka_bootstrap, f"t.out.{unique}", expect=1, timeout=60, settle=0.5)
    finally:
        admin.close()
        stage.signal(signal.SIGTERM)
        assert stage.wait(30) == 0
    assert request_ids(out) == ["req-2"]


def test_output_topics_are_refreshed_ahead_and_a_deleted_one_stops_being_trusted(
        kafka_bootstrap: str, unique: str) -> None:
    """A topic in use stays trusted past its TTL (a background thread asks again, so a
    transaction does not wait for the broker), and one deleted meanwhile is found by the next
    refresh, not trusted beyond it, and reported unwritable with the broker's reason."""
    topic = f"t.refresh.{unique}"
    create(kafka_bootstrap, topic, partitions=1)
    outputs = kafka_loop.OutputTopics(KafkaConfig(bootstrap_servers=kafka_bootstrap, output_check_ttl_ms=600),
                                      f"test-{unique}")
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    try:
        assert outputs.unwritable([topic]) == {}
        time.sleep(1.5)  # 2.5 TTLs: without the refresh the trust would have lapsed
        assert outputs.trusted(topic)
        delete_and_wait(admin, topic)
        deadline = time.monotonic() + 10
        while outputs.trusted(topic) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not outputs.trusted(topic)
        assert outputs.unwritable([topic]) == {topic: "UnknownTopicOrPartitionError"}
    finally:
        admin.close()
        outputs.close()
    assert f"test-{unique}-refresh" not in {t.name for t in threading.enumerate()}  # close() ended it


def test_record_the_broker_refuses_for_good_is_dead_lettered_alone_and_the_batch_goes_on(
        kafka_bootstrap: str, unique: str) -> None:
    """An output too large for its topic (max.message.bytes): the broker refuses the send, which
    before failed the transaction and so the batch, again on every redo."""
    small = f"t.small.{unique}"
    create(kafka_bootstrap, f"t.in.{unique}", f"t.out.{unique}", partitions=1)
    topics.ensure_topics(kafka_bootstrap, [topics.Topic(small, 1, {"max.message.bytes": "2000"}), topics.DEAD_LETTER])
    produce(kafka_bootstrap, f"t.in.{unique}", [
        ("conv-0", turn(0)), ("conv-0", turn(1, f"to:{small} " + "x" * 5000)), ("conv-0", turn(2))])
    dead_tail = Tail(kafka_bootstrap, topics.DEAD_LETTER.name)
    stage = start_stage(kafka_bootstrap, unique)
    try:
        out = read_all(kafka_bootstrap, f"t.out.{unique}", expect=2, timeout=40, settle=1.0)
        dead = dead_letters_from(dead_tail, f"t.in.{unique}", expect=1)
    finally:
        dead_tail.close()
        stage.signal(signal.SIGTERM)
        assert stage.wait(30) == 0
    assert request_ids(out) == ["req-0", "req-2"]
    assert request_ids(dead) == ["req-1"]
    assert small in events.header(dead[0].headers, "dlq-reason")
    assert stage.output().count("processed req-0") <= 2, "the batch was redone more than once"


def test_backlog_of_slow_records_longer_than_the_transaction_timeout_drains_exactly_once(
        kafka_bootstrap: str, unique: str) -> None:
    """36 records of 1 s each in one poll: 36 s of work in one batch. Before, that batch's one
    transaction outlived the coordinator's timeout (20 s, then the abort sweep every 10 s), was
    aborted and redone from the start, forever; nothing on the partition got through."""
    n = 36
    create(kafka_bootstrap, f"t.in.{unique}", f"t.out.{unique}", partitions=1)
    produce(kafka_bootstrap, f"t.in.{unique}", [(f"conv-{i % 4}", turn(i)) for i in range(n)])
    stage = start_stage(kafka_bootstrap, unique, delay=1.0, KAFKA_MAX_POLL_RECORDS="40",
                        KAFKA_TRANSACTION_TIMEOUT_MS="6000")  # budget: a third, 2 s
    started = time.monotonic()
    consumer = KafkaConsumer(f"t.out.{unique}", bootstrap_servers=kafka_bootstrap, group_id=None,
                             auto_offset_reset="earliest", enable_auto_commit=False,
                             isolation_level="read_committed", fetch_max_wait_ms=50)
    records: list = []
    first_after: float | None = None
    try:
        deadline = time.monotonic() + 120
        while len(records) < n and time.monotonic() < deadline:
            for recs in consumer.poll(timeout_ms=200).values():
                records.extend(recs)
            if records and first_after is None:
                first_after = time.monotonic() - started
        records.extend(read_all(kafka_bootstrap, f"t.out.{unique}", expect=0, settle=2.0)[len(records):])
        group = KafkaConsumer(bootstrap_servers=kafka_bootstrap, group_id=f"g.{unique}", enable_auto_commit=False)
        try:  # the stage's group, asked for its committed offset (not joined: nothing is assigned)
            committed = group.committed(TopicPartition(f"t.in.{unique}", 0))
        finally:
            group.close()
    finally:
        consumer.close()
        stage.signal(signal.SIGTERM)
        assert stage.wait(30) == 0
    assert sorted(request_ids(records)) == sorted(f"req-{i}" for i in range(n)), "lost or duplicated outputs"
    assert committed == n, "consumer lag is not 0"
    # Committed in parts: the first outputs were readable long before the backlog was done.
    assert first_after is not None and first_after < 12, first_after
    assert "batch over its time budget" in stage.output()


def test_two_replicas_without_INSTANCE_ID_share_the_work_without_fencing_each_other(
        kafka_bootstrap: str, unique: str) -> None:
    """Their ids come from their ports (the old fallback "0" gave both one static-membership and
    one transactional id: the second fenced the first, whose worker died)."""
    n = 30
    create(kafka_bootstrap, f"t.in.{unique}", f"t.out.{unique}")
    replicas = [start_stage(kafka_bootstrap, unique, INSTANCE_ID="", GRPC_PORT=str(free_port()))
                for _ in range(2)]
    try:
        produce(kafka_bootstrap, f"t.in.{unique}", [(f"conv-{i % 4}", turn(i)) for i in range(n)])
        records = read_all(kafka_bootstrap, f"t.out.{unique}", expect=n, settle=3.0)
        ids = sorted(events.decode(r.value, r.headers, events_pb2.TurnEvent).request_id for r in records)
        assert ids == sorted(f"req-{i}" for i in range(n)), "lost or duplicated outputs"
        assert [p.popen.poll() for p in replicas] == [None, None], [p.output()[-2000:] for p in replicas]
        assert not any("Fenced" in p.output() for p in replicas)
    finally:
        for p in replicas:
            p.signal(signal.SIGTERM)
    assert [p.wait(30) for p in replicas] == [0, 0]


def test_a_consumer_that_stops_fetching_is_replaced_and_the_stage_loses_and_doubles_nothing(
        kafka_bootstrap: str, unique: str) -> None:
    """kafka-python can stop sending FetchRequests with records waiting (kafka_loop.LagProbe); the
    sample stage's fault injection does exactly that after the 10th record. The stage must notice
    (~20 s of lag without progress), join with a new consumer and finish the backlog exactly once."""
    n = 40
    create(kafka_bootstrap, f"t.in.{unique}", f"t.out.{unique}")
    produce(kafka_bootstrap, f"t.in.{unique}", [(f"conv-{i % 4}", turn(i)) for i in range(10)])
    stage = start_stage(kafka_bootstrap, unique, STAGE_LOSE_FETCHES_AFTER="10")
    try:
        stage.wait_for(lambda out: "fetches lost" in out, timeout=60)
        # Produced after the fault: no fetch of the stuck consumer can have them buffered already.
        produce(kafka_bootstrap, f"t.in.{unique}", [(f"conv-{i % 4}", turn(i)) for i in range(10, n)])
        records = read_all(kafka_bootstrap, f"t.out.{unique}", expect=n, timeout=120, settle=3.0)
        out = stage.output()
    finally:
        stage.signal(signal.SIGTERM)
        assert stage.wait(30) == 0
    assert "fetches lost" in out, "the fault never fired: this test proved nothing"
    assert "Kafka consumer stopped reading; replacing it" in out
    ids = [events.decode(r.value, r.headers, events_pb2.TurnEvent).request_id for r in records]
    assert sorted(ids) == sorted(f"req-{i}" for i in range(n)), "lost or duplicated outputs"
