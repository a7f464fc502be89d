"""kafka_loop.LagProbe: the lag gauge, and when a loop must replace a consumer that stopped reading.

The stall it guards against (kafka-python sending no FetchRequest again, or never rejoining its
group) cannot be provoked on demand, so the real-broker tests build its two visible shapes with a
real consumer that is simply never polled: records waiting at a position that does not move, and a
subscribed member that never joins. The controls (a consumer that reads, an idle one, paused
partitions, a loop holding back on purpose) show the probe does not fire on a healthy consumer.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from kafka import KafkaConsumer, TopicPartition
from prometheus_client import REGISTRY

from services.common import kafka_loop
from services.common.config import KafkaConfig
from tests.common.kafka_util import create, produce


def lag_gauge(group: str, topic: str, partition: int) -> float | None:
    return REGISTRY.get_sample_value("colloquy_kafka_consumer_lag",
                                     {"group": group, "topic": topic, "partition": str(partition)})


def probe(group: str = "g.probe", **kw: int) -> kafka_loop.LagProbe:
    return kafka_loop.LagProbe(group, "probe-test", every_s=0, **kw)


class Stub:
    """Assigned partitions at fixed positions (unit test of the arithmetic and the error path)."""

    def __init__(self, ends: dict[TopicPartition, int], positions: dict[TopicPartition, int | None]) -> None:
        self.ends, self.positions, self.config = ends, positions, {"group_id": None}
        self.broken = False

    def assignment(self) -> set[TopicPartition]:
        return set(self.positions)

    def paused(self) -> set[TopicPartition]:
        return set()

    def subscription(self) -> None:
        return None

    def end_offsets(self, parts: list[TopicPartition], timeout_ms: int) -> dict[TopicPartition, int]:
        if self.broken:
            raise OSError("broker gone")
        return self.ends

    def position(self, tp: TopicPartition, timeout_ms: int) -> int | None:
        return self.positions[tp]


def test_gauge_is_each_partitions_gap_and_a_failed_probe_counts_neither_way() -> None:
    a, b, c = (TopicPartition("t.lag", i) for i in range(3))
    stub = Stub({a: 10, b: 3, c: 5}, {a: 4, b: 3, c: None})  # c: position not known yet
    p = probe("g.lag", stall_probes=2)
    assert p.stalled(stub) is False  # type: ignore[arg-type]  # the first probe only notes the positions
    assert (lag_gauge("g.lag", "t.lag", 0), lag_gauge("g.lag", "t.lag", 1)) == (6.0, 0.0)
    assert p.stalled(stub) is False  # type: ignore[arg-type]  # stuck once
    stub.broken = True
    assert p.stalled(stub) is False  # type: ignore[arg-type]  # failed: counts neither way
    stub.broken = False
    assert p.stalled(stub) is True  # type: ignore[arg-type]  # stuck twice: replace
    assert [p.stalled(stub), p.stalled(stub)] == [False, False]  # type: ignore[arg-type]  # starts over: notes, stuck once
    stub.positions[b] = 2  # b moved (backwards, as a seek to redo a batch does): progress, the count restarts
    assert [p.stalled(stub), p.stalled(stub), p.stalled(stub)] == [False, False, True]  # type: ignore[arg-type]


def test_probes_wait_their_interval() -> None:
    a = TopicPartition("t.lag", 0)
    stub = Stub({a: 10}, {a: 4})
    p = kafka_loop.LagProbe("g.wait", "probe-test", every_s=3600, stall_probes=1)
    assert [p.stalled(stub) for _ in range(5)] == [False] * 5  # type: ignore[arg-type]


@pytest.fixture
def topic(kafka_bootstrap: str) -> Iterator[str]:
    name = f"t.probe.{uuid.uuid4().hex[:8]}"
    create(kafka_bootstrap, name, partitions=2)
    produce(kafka_bootstrap, name, [(f"k{i}", b"x") for i in range(10)])
    yield name


def consumer(bootstrap: str, group: str | None) -> KafkaConsumer:
    return kafka_loop.make_consumer(KafkaConfig(bootstrap_servers=bootstrap), group, "probe-test")


@pytest.mark.kafka
def test_records_waiting_at_a_position_that_never_moves_replace_the_consumer(kafka_bootstrap: str,
                                                                             topic: str) -> None:
    # A group named but partitions assigned by hand (the gateway's reply router): no membership to
    # lose, so out_of_group_probes=2 must never fire below.
    c = consumer(kafka_bootstrap, f"g.probe.{uuid.uuid4().hex[:8]}")
    try:
        c.assign([TopicPartition(topic, 0), TopicPartition(topic, 1)])
        p = probe(stall_probes=3, out_of_group_probes=2)
        # Never polled: positions stay at 0 with records waiting. The first probe only notes them.
        assert [p.stalled(c) for _ in range(4)] == [False, False, False, True]
        assert [p.stalled(c) for _ in range(4)] == [False, False, False, True], "the count starts over"
        # A loop holding back on purpose (expect_progress=False) is not replaced, nor are paused partitions.
        assert not any(p.stalled(c, expect_progress=False) for _ in range(6))
        c.pause(*c.assignment())
        assert not any(p.stalled(c) for _ in range(6))
    finally:
        c.close()


@pytest.mark.kafka
def test_a_consumer_that_reads_or_has_nothing_to_read_is_left_alone(kafka_bootstrap: str, topic: str) -> None:
    c = consumer(kafka_bootstrap, None)
    try:
        parts = [TopicPartition(topic, 0), TopicPartition(topic, 1)]
        c.assign(parts)
        p = probe(stall_probes=2)
        got = 0
        for _ in range(200):
            # One record a probe: one partition moves, the other waits its turn, which is progress.
            got += sum(len(r) for r in c.poll(timeout_ms=100, max_records=1).values())
            assert p.stalled(c) is False
            if got == 10:
                break
        assert got == 10
        assert not any(p.stalled(c) for _ in range(6)), "caught up: no lag, nothing to replace"
        assert sum(lag_gauge("g.probe", topic, tp.partition) or 0 for tp in parts) == 0
    finally:
        c.close()


@pytest.mark.kafka
def test_a_member_that_never_joins_its_group_is_replaced(kafka_bootstrap: str, topic: str) -> None:
    c = consumer(kafka_bootstrap, f"g.probe.{uuid.uuid4().hex[:8]}")
    try:
        c.subscribe([topic])  # never polled: never joins
        p = probe(out_of_group_probes=3)
        assert [p.stalled(c) for _ in range(3)] == [False, False, True]
        while not c.assignment():  # a member that joined is in its group: the count stays at 0
            c.poll(timeout_ms=200)
        assert not any(p.stalled(c, expect_progress=False) for _ in range(6))
    finally:
        c.close()
