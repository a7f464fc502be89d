"""Reading the comparison dataset: window, source, rankings and ratings, prompt-level split."""

from __future__ import annotations

from pathlib import Path

from rlhf import data
from rlhf.data import FeedbackWindow
from services.feedback.dataset import write_rows
from tests.rlhf.synthetic import base_row

ANSWERS = ["a.", "b.", "c."]


def test_rankings_give_all_pairs_and_ratings_only_up_vs_down() -> None:
    rows = [
        base_row("q1", 1, kind="ranking", answers=ANSWERS, ranking=[2, 0, 1]),
        base_row("q2", 2, kind="ranking", answers=ANSWERS, ranking=[0, 0, 1]),      # duplicate index
        base_row("q3", 3, kind="rating", answers=ANSWERS, rating_answer_index=0, thumbs_up=True),
        base_row("q3", 4, kind="rating", answers=ANSWERS, rating_answer_index=1, thumbs_up=False),
        base_row("q3", 5, kind="rating", answers=ANSWERS, rating_answer_index=2, thumbs_up=False),
        base_row("q4", 6, kind="rating", answers=ANSWERS, rating_answer_index=0, thumbs_up=True),  # alone
        {**base_row("q5", 7, kind="ranking", answers=ANSWERS, ranking=[0, 1, 2]), "prompt": ""},
    ]
    items, stats = data.comparisons(rows)
    assert stats.as_dict() == {"rows": 7, "rankings": 1, "ratings": 4, "ratings_paired": 3,
                               "ratings_dropped": 1, "invalid": 1, "missing_prompt": 1, "pairs": 5,
                               "tied_pairs": 0, "all_tied": 0}
    ranking, rating = items
    assert ranking.answers == tuple(ANSWERS) and ranking.pairs == ((2, 0), (2, 1), (0, 1))
    # q3: "a." up beats "b." and "c." (down)
    assert rating.answers == ("a.", "b.", "c.") and rating.pairs == ((0, 1), (0, 2))


def test_a_rankings_ties_give_no_pairs_and_an_all_tied_ranking_no_comparison() -> None:
    rows = [
        base_row("q1", 1, kind="ranking", answers=ANSWERS, ranking=[2, 0, 1], ranking_tied_with_next=[True, False]),
        base_row("q2", 2, kind="ranking", answers=ANSWERS, ranking=[0, 1, 2], ranking_tied_with_next=[True, True]),
        base_row("q3", 3, kind="ranking", answers=ANSWERS, ranking=[0, 1, 2], ranking_tied_with_next=[True]),
        base_row("q4", 4, kind="ranking", answers=ANSWERS, ranking=[1, 2, 0], ranking_tied_with_next=None),
    ]
    items, stats = data.comparisons(rows)
    # q1: 2 and 0 tie, both beat 1; q2: all tied; q3: ties of the wrong length; q4: an older row, strict
    assert [c.pairs for c in items] == [((2, 1), (0, 1)), ((1, 2), (1, 0), (2, 0))]
    assert (stats.rankings, stats.invalid, stats.all_tied, stats.tied_pairs, stats.pairs) == (3, 1, 1, 4, 5)


def test_window_and_source_filters(tmp_path: Path) -> None:
    rows = [base_row("q1", 1_000, kind="ranking", answers=ANSWERS, ranking=[0, 1, 2]),
            base_row("q2", 2_000, kind="ranking", answers=ANSWERS, ranking=[0, 1, 2], source="human"),
            base_row("q3", 3_000, kind="ranking", answers=ANSWERS, ranking=[0, 1, 2])]
    write_rows(tmp_path, rows, 0, 0, 2)
    window = FeedbackWindow(1_000, 3_000)  # [since, until): q3 is after it
    assert [r["prompt"] for r in data.read_rows(tmp_path, "all", window)] == [rows[0]["prompt"], rows[1]["prompt"]]
    assert [r["prompt"] for r in data.read_rows(tmp_path, "human", window)] == [rows[1]["prompt"]]
    assert [r["prompt"] for r in data.read_rows(tmp_path, "simulated", FeedbackWindow(1_001, 10_000))] == [
        rows[2]["prompt"]]


def test_split_is_by_prompt_and_deterministic() -> None:
    items = [data.Comparison(f"prompt {i % 50}", ("a", "b"), ((0, 1),), "simulated") for i in range(200)]
    train, held = data.split(items, 20)
    held_prompts = {c.prompt for c in held}
    assert held_prompts.isdisjoint(c.prompt for c in train)
    assert 3 <= len(held_prompts) <= 20  # about 20 % of 50 prompts
    assert data.split(items, 20) == (train, held)
    assert data.split(items, 0) == (items, [])


def test_window_start_comes_from_the_base_manifest() -> None:
    assert data.window_since({"training": {"feedback_window": {"since_ms": 5, "until_ms": 42}}}) == 42
    assert data.window_since({"source": "smollm2"}) == 0


def test_answers_cut_short_are_marked_not_ended() -> None:
    rows = [
        base_row("q1", 1, kind="ranking", answers=ANSWERS, ranking=[2, 0, 1],
                 answer_finish_reasons=["stop", "length", "moderated"]),
        base_row("q2", 2, kind="ranking", answers=ANSWERS, ranking=[0, 1, 2]),  # no finish reasons recorded
        base_row("q3", 3, kind="rating", answers=ANSWERS, rating_answer_index=1, thumbs_up=True,
                 answer_finish_reasons=["stop", "length", "stop"]),
        base_row("q3", 4, kind="rating", answers=ANSWERS, rating_answer_index=0, thumbs_up=False,
                 answer_finish_reasons=["stop", "length", "stop"]),
    ]
    items, _ = data.comparisons(rows)
    assert [c.ended for c in items] == [(True, False, False), (), (False, True)]
    assert items[2].answers == ("b.", "a.")  # the up-rated (cut) answer first, its mark with it
