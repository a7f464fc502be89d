"""Choosing a DPO checkpoint on validation questions (rlhf.validation): the rule's record against
the parent, and which passing checkpoint is kept."""

from __future__ import annotations

from rlhf import preference, validation
from rlhf.validation import ValidationCheck, best_step


def test_the_record_counts_rule_wins_ties_and_losses_question_by_question() -> None:
    qs = ["What is the capital of Australia?", "Why do we have tides?", "What is a comet?"]
    parent = ["Canberra is the capital of Australia.", "Tides tides tides tides", "A comet is a ball of ice."]
    child = ["The capital", "The Moon's gravity pulls the oceans, which makes the tides.", "A comet is a ball of ice."]
    got = validation.record(12, qs, parent, child)
    assert preference.score(qs[0], child[0]) < preference.score(qs[0], parent[0])  # the test's premise
    assert got == ValidationCheck(12, wins=1, ties=1, losses=1)


def test_the_kept_step_has_most_wins_among_the_passing_then_fewest_losses_then_the_latest() -> None:
    scored = [ValidationCheck(12, 10, 15, 7), ValidationCheck(24, 14, 10, 8), ValidationCheck(36, 14, 12, 6),
              ValidationCheck(48, 18, 10, 4), ValidationCheck(60, 14, 12, 6)]
    assert best_step([12, 24, 36, 60], scored) == 60  # 48 has most wins but failed the quiz
    assert best_step([12, 24, 36], scored) == 36  # as many wins as 24, fewer losses
    assert best_step([12], scored) == 12
    assert best_step([], scored) is None


def test_the_validation_questions_are_in_the_prompts_file() -> None:
    asked = validation.questions()
    assert len(asked) == 32 and len(set(asked)) == 32
