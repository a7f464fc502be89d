"""The quality check's scoring, and its shape when run on the tiny model."""

from __future__ import annotations

from pathlib import Path

from model.quality import QUESTIONS, is_correct, questions_digest, run_quality


def test_scoring_is_case_insensitive_substring() -> None:
    assert is_correct("The capital of France is PARIS.", ("Paris",))
    assert is_correct("It was Leonardo.", ("Leonardo", "da Vinci"))
    assert not is_correct("El Salvador es el capital", ("Madrid",))


def test_question_set_is_stable() -> None:
    assert 10 <= len(QUESTIONS) <= 13
    assert any(q.history for q in QUESTIONS)  # one needs the conversation history
    assert questions_digest() == questions_digest()


def test_run_quality_on_tiny_model(tiny_model_dir: Path) -> None:
    result = run_quality(tiny_model_dir)
    assert result["total"] == len(QUESTIONS)
    assert 0 <= result["score"] <= result["total"]
    assert len(result["per_question"]) == len(QUESTIONS)
    assert result["decode_tok_s"] > 0
