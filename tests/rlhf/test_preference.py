"""The simulated labelers' rule: each term on hand-checked answers."""

from __future__ import annotations

import pytest

from model.chat_template import render_chatml
from rlhf import preference
from rlhf.preference import PreferenceWeights, question_of, rank, score, terms

Q = "What is the capital of France?"


def test_terms_on_hand_checked_answers() -> None:
    # content words of the question: {capital, france} ("what", "the", "of" are stop words)
    assert terms(Q, "The capital of France is Paris.") == {
        "concise": 1.0, "on_topic": 1.0, "full_stop": 1.0, "repetition": 0.0}
    # "paris" shares no content word; no full stop
    assert terms(Q, "Paris")["on_topic"] == 0.0 and terms(Q, "Paris")["full_stop"] == 0.0
    # 6 words -> 4 trigrams: (a b a) (b a b) (a b a) (b a b): 2 distinct -> repetition 1 - 2/4 = 0.5
    assert terms(Q, "a b a b a b")["repetition"] == 0.5
    # 60 words with target 30: 1 - (60 - 30) / 60 = 0.5
    assert terms(Q, " ".join(f"w{i}" for i in range(60)), target_words=30)["concise"] == 0.5


def test_score_weights_and_empty_answers() -> None:
    # 1 (concise) + 1 (on topic) + 0.5 (full stop) - 0 (repetition) = 2.5
    assert score(Q, "The capital of France is Paris.") == pytest.approx(2.5)
    assert score(Q, "   ") == -1.0
    only_stop = PreferenceWeights(concise=0.0, on_topic=0.0, full_stop=2.0, repetition=0.0, target_words=30)
    assert score(Q, "Paris.", only_stop) == 2.0
    assert score(Q, "Paris", only_stop) == 0.0


def test_rank_is_best_first_and_stable_on_ties() -> None:
    answers = ["Paris", "The capital of France is Paris.", "capital capital capital capital capital", "Paris"]
    assert rank(Q, answers) == [1, 0, 3, 2]


def test_the_question_is_read_out_of_a_chatml_prompt() -> None:
    prompt = render_chatml([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                            {"role": "user", "content": Q}])
    assert question_of(prompt) == Q
    assert score(prompt, "The capital of France is Paris.") == score(Q, "The capital of France is Paris.")


def test_weights_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RLHF_PREF_FULL_STOP", "3")
    assert preference.weights_from_env().full_stop == 3.0
