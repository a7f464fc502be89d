"""Feedback sink against the real broker: events become deduplicated Parquet rows by date."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from colloquy.v1 import chat_pb2, events_pb2
from kafka import KafkaConsumer

from devtools.procs import Proc, free_port
from services.common import topics
from services.common.config import KafkaConfig
from services.feedback import dataset
from services.feedback.worker import FeedbackSink
from tests.common.kafka_util import create, produce

pytestmark = pytest.mark.kafka


def ev(fid: str, kind: str, source: str = "human", order: tuple[int, ...] = (1, 0),
       conversation: str = "c") -> events_pb2.FeedbackEvent:
    e = events_pb2.FeedbackEvent(
        feedback_id=fid, user_id="u", conversation_id=conversation, turn_index=1, prompt="<|im_start|>user\nhi",
        answers=[chat_pb2.Answer(index=0, text="a0"), chat_pb2.Answer(index=1, text="a1")],
        model_version="v1", template_version="t1", source=source, created_unix_ms=int(time.time() * 1000))
    if kind == "rating":
        e.rating.CopyFrom(chat_pb2.Rating(answer_index=1, thumbs_up=True, comment="nice"))
    else:
        e.ranking.CopyFrom(chat_pb2.Ranking(order=list(order)))
    return e


def test_sink_writes_dataset_and_dedupes(kafka_bootstrap: str, unique: str, tmp_path: Path) -> None:
    topics.ensure_topics(kafka_bootstrap)
    root = tmp_path / "feedback"
    proc = Proc("services.feedback", {"FEEDBACK_DATASET_DIR": str(root), "GRPC_PORT": str(free_port()),
                                      "METRICS_PORT": str(free_port()), "INSTANCE_ID": unique})
    try:
        proc.wait_for(lambda out: '"msg": "serving"' in out)
        conv = f"c-{unique}"  # the shared topic holds other runs' feedback on other conversations
        items = [ev(f"{unique}-1", "rating", conversation=conv),
                 ev(f"{unique}-2", "ranking", "simulated", conversation=conv),
                 ev(f"{unique}-1", "rating", conversation=conv)]
        produce(kafka_bootstrap, topics.CHAT_FEEDBACK.name, [(conv, e) for e in items])
        deadline = time.monotonic() + 60
        mine: list[dict] = []
        while time.monotonic() < deadline and len(mine) < 2:
            mine = [r for r in dataset.read(root).to_pylist() if r["feedback_id"].startswith(unique)]
            time.sleep(0.5)
    finally:
        proc.signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    assert sorted(r["feedback_id"] for r in mine) == [f"{unique}-1", f"{unique}-2"]
    rating = next(r for r in mine if r["kind"] == "rating")
    assert rating["answers"] == ["a0", "a1"] and rating["thumbs_up"] and rating["rating_answer_index"] == 1
    ranking = next(r for r in mine if r["kind"] == "ranking")
    assert ranking["ranking"] == [1, 0] and ranking["source"] == "simulated"
    assert [r["feedback_id"] for r in dataset.read(root, source="simulated").to_pylist()
            if r["conversation_id"] == conv] == [f"{unique}-2"]
    assert list(root.glob("date=*/part-p*.parquet"))


def test_resubmitted_ranking_through_the_sink_replaces_the_earlier_one(
        kafka_bootstrap: str, unique: str, tmp_path: Path) -> None:
    topic = f"t.feedback.{unique}"
    create(kafka_bootstrap, topic, partitions=1)
    root = tmp_path / "feedback"
    sink = FeedbackSink(KafkaConfig(bootstrap_servers=kafka_bootstrap), root, unique, topic=topic,
                        group_id=f"g.{unique}").start()
    try:
        conv = f"conv-{unique}"
        produce(kafka_bootstrap, topic, [(conv, ev(f"{unique}-1", "ranking", order=(1, 0), conversation=conv))])
        time.sleep(0.01)  # a later submission, as a person's would be
        produce(kafka_bootstrap, topic, [(conv, ev(f"{unique}-2", "ranking", order=(0, 1), conversation=conv)),
                                         (conv, ev(f"{unique}-3", "rating", conversation=conv))])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(list(root.glob("date=*/*.parquet"))) < 2:
            time.sleep(0.2)
        time.sleep(1.0)
    finally:
        sink.stop()
    assert sink.error is None
    rows = dataset.read(root).to_pylist()
    assert sorted((r["feedback_id"], r["kind"]) for r in rows) == [
        (f"{unique}-2", "ranking"), (f"{unique}-3", "rating")]
    assert next(r["ranking"] for r in rows if r["kind"] == "ranking") == [0, 1]


def test_sink_fsyncs_the_file_and_its_directory_before_committing_offsets(
        kafka_bootstrap: str, unique: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: offsets were committed after a rename nothing had fsynced; a power cut could leave
    an empty or missing file behind offsets that say its feedback was stored."""
    topic = f"t.feedback.{unique}"
    create(kafka_bootstrap, topic, partitions=1)
    root = tmp_path / "feedback"
    calls: list[tuple[str, str]] = []
    real_fsync, real_commit = os.fsync, KafkaConsumer.commit

    def fsync(fd: int) -> None:  # records which file or directory, then really fsyncs
        calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def commit(self: KafkaConsumer, *args: object, **kwargs: object) -> object:
        calls.append(("commit", ""))
        return real_commit(self, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(KafkaConsumer, "commit", commit)
    sink = FeedbackSink(KafkaConfig(bootstrap_servers=kafka_bootstrap), root, unique, topic=topic,
                        group_id=f"g.{unique}").start()
    try:
        produce(kafka_bootstrap, topic, [("c", ev(f"{unique}-1", "rating"))])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and ("commit", "") not in calls:
            time.sleep(0.1)
    finally:
        sink.stop()
    [path] = root.glob("date=*/*.parquet")
    assert ("commit", "") in calls, "the sink never committed"
    before = calls[:calls.index(("commit", ""))]
    file_synced = ("fsync", str(path.with_suffix(".parquet.tmp")))  # its bytes, before the rename
    dir_synced = ("fsync", str(path.parent))                        # the rename
    assert file_synced in before and dir_synced in before, calls
    assert before.index(file_synced) < before.index(dir_synced)
    assert ("fsync", str(root)) in before  # the new date folder's entry
