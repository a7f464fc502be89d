"""The quality gate: its matcher, its gate rule, the question set, and its shape on the tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest

from model.quality import (
    CAPITALS_16,
    MAX_NEW_TOKENS,
    QUESTIONS,
    is_correct,
    percent,
    questions_digest,
    run_quality,
    within_gate,
)


@pytest.mark.parametrize(("answer", "accept", "right"), [
    ("The capital of France is PARIS.", ("Paris",), True),
    ("It was Leonardo.", ("Leonardo", "da Vinci"), True),
    ("El Salvador es el capital", ("Madrid",), False),
    # Numbers: whole numbers only, digits or words.
    ("7 plus 5 is 12.", ("12", "twelve"), True),
    ("Twelve!", ("12", "twelve"), True),
    ("The answer is 120.", ("12", "twelve"), False),
    ("It is 112 or so", ("12",), False),
    ("About 1.25 of them", ("12",), False),
    ("Exactly 3.12 metres", ("12",), False),
    ("That costs $12, or 12.", ("12",), True),
    ("Water freezes at 0°C.", ("0", "zero"), True),
    ("Water boils at 100 degrees.", ("0", "zero"), False),
    ("ninety nine", ("ninety-nine",), True),
    ("1,000 grams", ("1000", "1,000"), True),
    ("10,000 grams", ("1000", "1,000"), False),
    # Words: no match inside a longer word; spacing and punctuation between words are free.
    ("Romeo and Juliet", ("Rome",), False),
    ("The capital is New  Delhi.", ("New Delhi",), True),
    ("1, 2, 3, 4, 5", ("1 2 3 4 5",), True),
    ("It's t-a-c", ("tac", "t-a-c"), True),
    ("The chemical formula is H2O.", ("H2O",), True),
    ("", ("Paris",), False),
])
def test_matching_is_case_insensitive_on_word_boundaries(answer: str, accept: tuple[str, ...],
                                                          right: bool) -> None:
    assert is_correct(answer, accept) is right


def test_gate_is_two_points_below_the_reference_or_better() -> None:
    assert within_gate(80.0, 82.0)  # exactly 2 points: inside
    assert within_gate(percent(117, 150), percent(120, 150))  # 3 of 150 = 2.0 points, float-safe
    assert not within_gate(percent(116, 150), percent(120, 150))
    assert within_gate(90.0, 85.0)  # better than the reference passes
    assert not within_gate(79.9, 82.0)
    assert within_gate(79.0, 82.0, points=3.0)
    assert percent(0, 0) == 0.0 and percent(1, 3) == 33.33


def test_question_set_is_big_varied_and_well_formed() -> None:
    assert len(QUESTIONS) >= 150
    prompts = [(q.prompt, q.history) for q in QUESTIONS]
    assert len(set(prompts)) == len(prompts), "duplicate question"
    assert {"capitals-16", "capitals", "arithmetic", "units", "opposites", "fact", "instruction",
            "history"} <= {q.category for q in QUESTIONS}
    assert all(q.accept and all(a.strip() for a in q.accept) for q in QUESTIONS)
    assert any(q.history and "Biscuit" in q.accept for q in QUESTIONS)  # DESIGN.md's memory case
    assert 24 <= MAX_NEW_TOKENS <= 32  # one quick greedy pass; answers come first
    assert questions_digest() == questions_digest()


def test_capitals_16_is_the_model_notes_quiz() -> None:
    assert len(CAPITALS_16) == 16 and set(CAPITALS_16) <= set(QUESTIONS)
    countries = " ".join(q.prompt for q in CAPITALS_16)
    for country in ("France", "Germany", "Italy", "Spain", "Japan", "United Kingdom", "Egypt", "Canada",
                    "Russia", "China", "Australia", "Brazil", "India", "Mexico", "Greece", "Portugal"):
        assert country in countries


def test_echoing_the_question_is_not_an_answer() -> None:
    """A model that repeats the prompt must not score: no accepted answer is in its own question
    (except instructions that ask for an echo)."""
    echo_ok = {"Say hello.", "Repeat after me: blue sky.", "Reply with only the word yes."}
    echoed = [q.prompt for q in QUESTIONS if q.prompt not in echo_ok and is_correct(q.prompt, q.accept)]
    assert not echoed


def test_run_quality_on_tiny_model(tiny_model_dir: Path) -> None:
    result = run_quality(tiny_model_dir)
    assert result["total"] == len(QUESTIONS)
    assert 0 <= result["score"] <= result["total"]
    assert result["score_pct"] == percent(result["score"], result["total"])
    assert result["capitals_16"]["total"] == 16 and 0 <= result["capitals_16"]["score"] <= 16
    assert sum(c["total"] for c in result["categories"].values()) == len(QUESTIONS)
    assert len(result["per_question"]) == len(QUESTIONS)
    assert result["decode_tok_s"] > 0 and result["wall_s"] > 0
    assert result["questions_digest"] == questions_digest()
