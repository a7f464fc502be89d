"""Feedback sink against the real broker: events become deduplicated Parquet rows by date."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
from colloquy.v1 import chat_pb2, events_pb2

from services.common import topics
from services.feedback import dataset
from tests.common.kafka_util import produce
from tests.common.procs import Proc
from tests.conftest import free_port

pytestmark = pytest.mark.kafka


def ev(fid: str, kind: str, source: str = "human") -> events_pb2.FeedbackEvent:
    e = events_pb2.FeedbackEvent(
        feedback_id=fid, user_id="u", conversation_id="c", turn_index=1, prompt="<|im_start|>user\nhi",
        answers=[chat_pb2.Answer(index=0, text="a0"), chat_pb2.Answer(index=1, text="a1")],
        model_version="v1", template_version="t1", source=source, created_unix_ms=int(time.time() * 1000))
    if kind == "rating":
        e.rating.CopyFrom(chat_pb2.Rating(answer_index=1, thumbs_up=True, comment="nice"))
    else:
        e.ranking.CopyFrom(chat_pb2.Ranking(order=[1, 0]))
    return e


def test_sink_writes_dataset_and_dedupes(kafka_bootstrap: str, unique: str, tmp_path: Path) -> None:
    topics.ensure_topics(kafka_bootstrap)
    root = tmp_path / "feedback"
    proc = Proc("services.feedback", {"FEEDBACK_DATASET_DIR": str(root), "GRPC_PORT": str(free_port()),
                                      "METRICS_PORT": str(free_port()), "INSTANCE_ID": unique})
    try:
        proc.wait_for(lambda out: '"msg": "serving"' in out)
        items = [ev(f"{unique}-1", "rating"), ev(f"{unique}-2", "ranking", "simulated"), ev(f"{unique}-1", "rating")]
        produce(kafka_bootstrap, topics.CHAT_FEEDBACK.name, [("c", e) for e in items])
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
    assert [r["feedback_id"] for r in dataset.read(root, source="simulated").to_pylist()] == [f"{unique}-2"]
    assert list(root.glob("date=*/part-p*.parquet"))
