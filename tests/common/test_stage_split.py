"""A stage's own time split (colloquy_stage_seconds), which the pipeline benchmark reads."""

from __future__ import annotations

import time
from collections.abc import Iterator

from colloquy.v1 import events_pb2
from prometheus_client import REGISTRY

from services.common import kafka_loop
from services.common.config import KafkaConfig
from tests.common.kafka_util import create, produce, read_all


def _count(stage: str, part: str) -> float:
    return REGISTRY.get_sample_value("colloquy_stage_seconds_count", {"stage": stage, "part": part}) or 0.0


def _records(stage: str) -> float:
    return REGISTRY.get_sample_value("colloquy_stage_batch_records_sum", {"stage": stage}) or 0.0


def test_each_record_and_transaction_is_timed_by_part(kafka_bootstrap: str, unique: str) -> None:
    stage, src, dst = f"split-{unique}", f"split-in-{unique}", f"split-out-{unique}"
    create(kafka_bootstrap, src, dst)

    def handle(ev: kafka_loop.Consumed[events_pb2.TurnEvent]) -> Iterator:
        yield ev.out(dst, ev.message)

    worker = kafka_loop.StageWorker(stage, [src], events_pb2.TurnEvent, handle,
                                    KafkaConfig(bootstrap_servers=kafka_bootstrap), instance_id="0").start()
    try:
        produce(kafka_bootstrap, src, [(f"k{i}", events_pb2.TurnEvent(request_id=f"r{i}")) for i in range(3)])
        assert len(read_all(kafka_bootstrap, dst, 3, settle=0.5)) == 3
        deadline = time.monotonic() + 10
        while _records(stage) < 3 and time.monotonic() < deadline:  # observed just after each commit
            time.sleep(0.05)
        assert _count(stage, "arrival") == 3  # one per record
        transactions = _count(stage, "commit")
        assert 1 <= transactions <= 3  # one per polled batch: records waiting together share one
        assert _count(stage, "process") == _count(stage, "send") == transactions
        assert _records(stage) == 3
    finally:
        worker.stop()


def test_at_once_outputs_go_out_once_alongside_the_transactional_ones(kafka_bootstrap: str, unique: str) -> None:
    """An `at_once` output (sent before the commit, outside the transaction) arrives once, like
    the record's transactional output, and the offsets are committed (no redo sends it again)."""
    stage, src, early, late = (f"once-{unique}", f"once-in-{unique}", f"once-early-{unique}",
                               f"once-late-{unique}")
    create(kafka_bootstrap, src, early, late)

    def handle(ev: kafka_loop.Consumed[events_pb2.TurnEvent]) -> Iterator:
        first = ev.out(early, ev.message)
        first.at_once = True
        yield first
        yield ev.out(late, ev.message)

    cfg = KafkaConfig(bootstrap_servers=kafka_bootstrap)
    worker = kafka_loop.StageWorker(stage, [src], events_pb2.TurnEvent, handle, cfg, instance_id="0").start()
    try:
        produce(kafka_bootstrap, src, [(f"k{i}", events_pb2.TurnEvent(request_id=f"r{i}")) for i in range(5)])
        got_early = read_all(kafka_bootstrap, early, 5, settle=1.0)
        got_late = read_all(kafka_bootstrap, late, 5, settle=0.5)
    finally:
        worker.stop()
    assert sorted(r.key for r in got_early) == sorted(r.key for r in got_late) == [f"k{i}".encode() for i in range(5)]
    again = kafka_loop.StageWorker(stage, [src], events_pb2.TurnEvent, handle, cfg, instance_id="0").start()
    try:  # the same group again: nothing left to redo
        time.sleep(3)
        assert len(read_all(kafka_bootstrap, early, 5, settle=0.5)) == 5
    finally:
        again.stop()


def test_prepare_sees_each_polled_batch_before_its_handlers_and_a_failing_one_loses_nothing(
        kafka_bootstrap: str, unique: str) -> None:
    """`prepare` gets the decodable messages of each polled batch before any of their handlers
    run (a poison record is left to its handler's dead-lettering); when it raises, the handlers
    still process every record."""
    stage, src, dst = f"prep-{unique}", f"prep-in-{unique}", f"prep-out-{unique}"
    create(kafka_bootstrap, src, dst)
    prepared: list[str] = []
    handled: list[str] = []
    fail = {"on": False}

    def prepare(batch: list[events_pb2.TurnEvent]) -> None:
        prepared.extend(t.request_id for t in batch)
        if fail["on"]:
            raise RuntimeError("prepare fails")

    def handle(ev: kafka_loop.Consumed[events_pb2.TurnEvent]) -> Iterator:
        assert ev.message.request_id in prepared  # prepared before its handler ran
        handled.append(ev.message.request_id)
        yield ev.out(dst, ev.message)

    worker = kafka_loop.StageWorker(stage, [src], events_pb2.TurnEvent, handle,
                                    KafkaConfig(bootstrap_servers=kafka_bootstrap), instance_id="0",
                                    prepare=prepare).start()
    try:
        produce(kafka_bootstrap, src, [("k", events_pb2.TurnEvent(request_id=f"r{i}")) for i in range(3)]
                + [("k", b"\x08\x96\x01\xff\xfe garbage")])
        assert len(read_all(kafka_bootstrap, dst, 3, settle=0.5)) == 3
        fail["on"] = True
        produce(kafka_bootstrap, src, [("k", events_pb2.TurnEvent(request_id=f"s{i}")) for i in range(3)])
        assert len(read_all(kafka_bootstrap, dst, 6, settle=0.5)) == 6
    finally:
        worker.stop()
    assert sorted(prepared) == sorted(handled) == ["r0", "r1", "r2", "s0", "s1", "s2"]


def test_the_pipeline_benchmark_adds_up_what_each_path_put_in_the_engine_histograms() -> None:
    """bench.pipeline scrapes the replica before and after each path's round and keeps the sum of
    the differences, bucket by bucket, so each path's p50 counts only its own requests."""
    from bench.pipeline import _accumulate, _bucket_quantile

    inf = float("inf")
    into: dict = {}
    _accumulate(into, {"queue": [(0.01, 1.0), (inf, 1.0)]}, {"queue": [(0.01, 3.0), (inf, 4.0)]})
    _accumulate(into, {}, {"queue": [(0.01, 0.0), (inf, 2.0)]})  # a first scrape before any request
    assert into == {"queue": [(0.01, 2.0), (inf, 5.0)]}
    assert abs(_bucket_quantile(into["queue"], 0.2) - 0.005) < 1e-9  # 1 of 5: half way into the first bucket
