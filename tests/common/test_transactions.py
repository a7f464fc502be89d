"""Hanging-transaction janitor: the decision on hand-made cases, then a real hanging
transaction on the real broker, found and aborted."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import pytest
from kafka import KafkaAdminClient, KafkaConsumer
from kafka.admin._configs import ConfigResource, ConfigResourceType
from kafka.admin._transactions import TransactionState
from kafka.protocol.producer.produce import ProduceRequest
from kafka.protocol.producer.transaction import InitProducerIdRequest
from kafka.record.default_records import DefaultRecordBatchBuilder
from kafka.structs import TopicPartition

from services.common import kafka_loop, topics
from services.common.config import KafkaConfig
from services.common.transactions import CoordinatorView, Janitor, OpenTransaction, find_hanging, watched_topics
from tests.common.kafka_util import create

TP = TopicPartition("chat.prompts", 2)
NOW = 1_000_000


def open_txn(pid: int = 7, epoch: int = 3, idle_ms: int = 600_000, tp: TopicPartition = TP) -> OpenTransaction:
    return OpenTransaction(tp, pid, epoch, start_offset=41, last_write_ms=NOW - idle_ms)


def view(state: TransactionState = TransactionState.ONGOING, epoch: int = 3,
         parts: tuple[TopicPartition, ...] = (TP,)) -> CoordinatorView:
    return CoordinatorView(state, epoch, frozenset(parts))


def test_unknown_to_the_coordinator_and_idle_is_hanging() -> None:
    assert find_hanging([open_txn()], {}, NOW, older_than_ms=120_000) == [open_txn()]


def test_recent_write_is_left_alone_whatever_the_coordinator_says() -> None:
    # Markers may be on their way: a partition written 10 s ago is never touched.
    assert find_hanging([open_txn(idle_ms=10_000)], {}, NOW, older_than_ms=120_000) == []


def test_in_progress_at_the_coordinator_is_left_alone() -> None:
    for state in (TransactionState.ONGOING, TransactionState.PREPARE_COMMIT, TransactionState.PREPARE_ABORT):
        assert find_hanging([open_txn()], {7: view(state)}, NOW, 120_000) == []
    # A newer epoch of the same producer in progress on the partition will fence and abort it.
    assert find_hanging([open_txn(epoch=3)], {7: view(epoch=4)}, NOW, 120_000) == []


def test_coordinator_finished_or_elsewhere_means_hanging() -> None:
    txn = open_txn()
    for state in (TransactionState.COMPLETE_COMMIT, TransactionState.COMPLETE_ABORT, TransactionState.EMPTY):
        assert find_hanging([txn], {7: view(state)}, NOW, 120_000) == [txn]
    other = TopicPartition("chat.prompts", 5)
    assert find_hanging([txn], {7: view(parts=(other,))}, NOW, 120_000) == [txn]
    assert find_hanging([txn], {7: view(epoch=2)}, NOW, 120_000) == [txn]
    assert find_hanging([txn], {8: view()}, NOW, 120_000) == [txn]


def test_watched_topics_are_ours_replies_and_offsets() -> None:
    names = ["chat.requests", "chat.replies.gw-1", "__consumer_offsets", "someone.elses", "__transaction_state"]
    assert watched_topics(names) == ["__consumer_offsets", "chat.replies.gw-1", "chat.requests"]
    assert set(watched_topics(t.name for t in topics.ALL)) == {t.name for t in topics.ALL}


# -- against the real broker ------------------------------------------------------------------

@contextlib.contextmanager
def partition_verification_off(admin: KafkaAdminClient) -> Iterator[None]:
    """Kafka >= 3.6 makes a leader check with the coordinator before it takes a transaction's
    first write (KIP-890 part 1), which is what makes hanging transactions rare. Turning that
    off for a moment lets this test make one the way an old client or a lost marker does."""
    key = "transaction.partition.verification.enable"
    admin.alter_configs([ConfigResource(ConfigResourceType.BROKER, "1", {key: "false"})])
    try:
        time.sleep(0.5)  # the dynamic config reaches the request handlers asynchronously
        yield
    finally:
        admin.alter_configs([ConfigResource(ConfigResourceType.BROKER, "1", {key: "true"})])


def write_orphan_transaction(admin: KafkaAdminClient, tp: TopicPartition,
                             producer: tuple[int, int, int] | None = None) -> int:
    """A transactional record batch its coordinator never hears of: open forever. From a new
    producer id, or from `producer` = (id, epoch, next sequence) of one the coordinator knows."""

    manager = admin._manager

    async def init() -> Any:
        return await manager.send(InitProducerIdRequest(transactional_id=None, transaction_timeout_ms=-1), node_id=1)

    if producer is None:
        for _ in range(30):  # retried from outside: kafka-python's I/O loop is not asyncio's (no asyncio.sleep)
            reply = manager.run(init)
            if reply.error_code == 0:
                break
            time.sleep(1)
        producer = (reply.producer_id, reply.producer_epoch, 0)
    pid, epoch, sequence = producer

    async def go() -> int:
        builder = DefaultRecordBatchBuilder(2, 0, True, pid, epoch, sequence, 1 << 20)
        builder.append(0, int(time.time() * 1000), b"k", b"orphan", [])
        topic = ProduceRequest.TopicProduceData
        res = await manager.send(ProduceRequest(
            transactional_id="test-orphan", acks=-1, timeout_ms=5000, min_version=3, max_version=9,
            topic_data=[topic(name=tp.topic, partition_data=[
                topic.PartitionProduceData(index=tp.partition, records=bytes(builder.build()))])]), node_id=1)
        assert res.responses[0].partition_responses[0].error_code == 0, res
        return int(pid)

    return admin._manager.run(go)


def stable_end(bootstrap: str, tp: TopicPartition) -> int:
    """What a read_committed consumer may read up to (the last stable offset)."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, isolation_level="read_committed")
    try:
        return int(consumer.end_offsets([tp])[tp])
    finally:
        consumer.close()


@pytest.mark.kafka
def test_real_hanging_transaction_is_found_and_aborted(kafka_bootstrap: str, unique: str) -> None:
    topic = f"{topics.REPLY_PREFIX}janitor-{unique}"
    create(kafka_bootstrap, topic, partitions=2)
    tp, live_tp = TopicPartition(topic, 0), TopicPartition(topic, 1)
    kafka = KafkaConfig(bootstrap_servers=kafka_bootstrap)
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap, client_id="test-janitor")
    live = kafka_loop.make_producer(kafka, "test-live", transactional_id=f"test-live-{unique}")
    janitor = Janitor(kafka, older_than_ms=0, topics=[topic])
    try:
        with partition_verification_off(admin):
            pid = write_orphan_transaction(admin, tp)
        # A live transaction, open but known to its coordinator: never a janitor's business.
        live.init_transactions()
        live.begin_transaction()
        live.send(topic, value=b"live", partition=1)
        live.flush()
        assert stable_end(kafka_bootstrap, tp) == 0  # the orphan holds every reader back

        assert [(t.partition, t.producer_id) for t in Janitor(kafka, 0, topics=[topic], dry_run=True).sweep()] \
            == [(tp, pid)]
        assert stable_end(kafka_bootstrap, tp) == 0  # a dry run aborts nothing

        hanging = janitor.sweep()
        assert [(t.partition, t.producer_id) for t in hanging] == [(tp, pid)]
        assert stable_end(kafka_bootstrap, tp) == 2  # the orphan record and the abort marker
        assert janitor.sweep() == []  # nothing left open but the live one

        live.commit_transaction()  # untouched by the sweeps: it still commits
        assert stable_end(kafka_bootstrap, live_tp) == 2
    finally:
        janitor.close()
        live.close(timeout=5)
        admin.delete_topics([topic])
        admin.close()


@pytest.mark.kafka
def test_hanging_transaction_of_a_producer_that_committed_there_before_is_aborted(
        kafka_bootstrap: str, unique: str) -> None:
    """A producer's earlier commit left a marker on the partition, so the leader holds that
    coordinator's epoch for it; its next transaction never reached the coordinator (a broker
    restart in CI left one on __consumer_offsets). The abort must carry that epoch: with -1 the
    leader refused it as fenced, every sweep failed, and the consumer group stayed blocked."""
    topic = f"{topics.REPLY_PREFIX}janitor-epoch-{unique}"
    create(kafka_bootstrap, topic, partitions=1)
    tp = TopicPartition(topic, 0)
    kafka = KafkaConfig(bootstrap_servers=kafka_bootstrap)
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap, client_id="test-janitor-epoch")
    producer = kafka_loop.make_producer(kafka, "test-committed", transactional_id=f"test-committed-{unique}")
    janitor = Janitor(kafka, older_than_ms=0, topics=[topic])
    try:
        producer.init_transactions()
        producer.begin_transaction()
        producer.send(topic, value=b"committed", partition=0)
        producer.commit_transaction()
        state = admin.describe_producers([tp])[tp].active_producers[0]
        assert state.coordinator_epoch >= 0 and state.current_transaction_start_offset < 0
        with partition_verification_off(admin):
            write_orphan_transaction(admin, tp, (state.producer_id, state.producer_epoch, state.last_sequence + 1))
        assert stable_end(kafka_bootstrap, tp) == 2  # the commit and its marker; the orphan holds the rest

        hanging = janitor.sweep()
        assert [(t.partition, t.producer_id, t.coordinator_epoch) for t in hanging] == [
            (tp, state.producer_id, state.coordinator_epoch)]
        assert stable_end(kafka_bootstrap, tp) == 4  # the orphan record and the abort marker
        assert janitor.sweep() == []
    finally:
        janitor.close()
        producer.close(timeout=5)
        admin.delete_topics([topic])
        admin.close()


@pytest.mark.kafka
def test_cli_dry_run_pushes_its_metrics(kafka_bootstrap: str) -> None:
    """The k8s CronJob's command: one sweep, a summary line, the metrics pushed (no scrape port)."""
    import http.server
    import os
    import subprocess
    import sys
    import threading

    pushed: list[tuple[str, bytes]] = []

    class Gateway(http.server.BaseHTTPRequestHandler):
        def do_PUT(self) -> None:
            pushed.append((self.path, self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Gateway)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        out = subprocess.run(
            [sys.executable, "-m", "services.common.transactions", "--dry-run", "--older-than", "3600",
             "--pushgateway", f"http://127.0.0.1:{server.server_port}"],
            env={**os.environ, "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap}, capture_output=True, text=True,
            timeout=120)
    finally:
        server.shutdown()
    assert out.returncode == 0, out.stderr
    assert "0 hanging transaction(s) found" in out.stderr
    [(path, body)] = pushed
    assert path == "/metrics/job/kafka-txn-janitor"
    assert b"colloquy_kafka_hanging_transactions 0.0" in body
    assert b"colloquy_kafka_hanging_transaction_sweeps_failed_total 0.0" in body
    # Every watched topic's abort counter exists at 0 (alerts and dashboards need the series).
    assert b'colloquy_kafka_hanging_transactions_aborted_total{topic="chat.prompts"} 0.0' in body
    assert b'colloquy_kafka_hanging_transactions_aborted_total{topic="__consumer_offsets"} 0.0' in body


def test_poll_rides_out_a_broker_outage() -> None:
    """A broker restart makes kafka-python's poll() raise; the stage must poll again, not die."""
    from kafka.errors import CommitFailedError, KafkaConnectionError

    from services.common.kafka_loop import poll_through_outages

    class Consumer:
        def __init__(self, exc: Exception) -> None:
            self.exc = exc

        def poll(self, timeout_ms: int) -> dict:
            raise self.exc

    assert poll_through_outages(Consumer(KafkaConnectionError("socket disconnected")), 10, "t") == {}
    with pytest.raises(CommitFailedError):  # not retriable: the caller's recovery decides
        poll_through_outages(Consumer(CommitFailedError()), 10, "t")
