"""Simulated labelers against the real stack: gateway -> chat.feedback -> feedback sink -> Parquet,
read back by the RLHF job's own reader. Served model: the tiny one (answers are noise, rankable)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.stack import Stack
from rlhf import data, labelers, preference

pytestmark = [pytest.mark.kafka, pytest.mark.pipeline]


@pytest.fixture(scope="module")
def stack_and_dataset(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, Path]]:
    from model.tiny import cached_tiny_model

    dataset = tmp_path_factory.mktemp("feedback")
    stack = Stack(kafka_bootstrap, extra_env={
        "generation": {"GENERATION_MODEL_DIR": str(cached_tiny_model()), "GENERATION_MODEL_VERSION": "tiny"},
        "feedback": {"FEEDBACK_DATASET_DIR": str(dataset)}}).start()
    try:
        yield stack, dataset
    finally:
        stack.stop()


def test_simulated_rankings_reach_the_dataset(stack_and_dataset: tuple[Stack, Path]) -> None:
    stack, dataset = stack_and_dataset
    questions = labelers.train_questions()[:2]
    labeler = labelers.SimulatedLabeler(stack.gateway, "colloquy-dev-key", n=3, temperature=0.9, max_tokens=12)
    try:
        submitted = labelers.run(labeler, questions)
    finally:
        labeler.close()
    assert [s.question for s in submitted] == questions
    window = data.FeedbackWindow(0, 2**62)
    deadline = time.monotonic() + 120
    rows: list[dict] = []
    while time.monotonic() < deadline and len(rows) < len(submitted):
        rows = data.read_rows(dataset, "simulated", window)
        time.sleep(0.5)
    assert sorted(r["feedback_id"] for r in rows) == sorted(s.feedback_id for s in submitted)
    by_id = {s.feedback_id: s for s in submitted}
    for row in rows:
        sent = by_id[row["feedback_id"]]
        assert row["kind"] == "ranking" and row["source"] == "simulated"
        assert len(row["answers"]) == 3
        assert row["ranking"] == sent.ranking == preference.rank(sent.question, row["answers"])
        scores = [preference.score(sent.question, a) for a in row["answers"]]
        assert row["ranking_tied_with_next"] == sent.tied_with_next == preference.tied_with_next(sent.ranking, scores)
    assert data.read_rows(dataset, "human", window) == []
    # The prompt as the model saw it (hidden instructions included) must reach the dataset: the
    # reward model learns nothing true from answers without their question.
    for row in rows:
        assert by_id[row["feedback_id"]].question in row["prompt"], row["prompt"][:200]
    items, stats = data.comparisons(rows)
    assert stats.rankings == len(submitted)
    # Every pair but the tied ones: 3 of 3 answers, less the pairs inside a run of ties.
    assert stats.pairs + stats.tied_pairs == 3 * len(submitted) and len(items) == len(submitted) - stats.all_tied


def test_labelers_rank_only_the_version_they_are_told_to(stack_and_dataset: tuple[Stack, Path]) -> None:
    """A round's labels must describe the round's base: with ``version`` set, turns answered by
    another version are not ranked, and waiting for a version the gateway never serves fails with
    a message naming both."""
    stack, _ = stack_and_dataset
    question = labelers.train_questions()[0]
    served = labelers.SimulatedLabeler(stack.gateway, "colloquy-dev-key", n=2, max_tokens=8, version="tiny")
    other = labelers.SimulatedLabeler(stack.gateway, "colloquy-dev-key", n=2, max_tokens=8, version="round-1-child")
    try:
        assert served.wait_until_served(30) == "tiny"
        assert served.label(question, seed=1) is not None and served.skipped_versions == {}
        assert other.label(question, seed=1) is None
        assert other.skipped_versions == {"tiny": 1}
        with pytest.raises(labelers.LabelerError, match=r"still answers with 'tiny'.*not 'round-1-child'"):
            other.wait_until_served(0.5, pause_s=0.1)
    finally:
        served.close()
        other.close()
