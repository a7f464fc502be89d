"""rlhf.fact_drift's pure parts: which training question a served prompt asks, and the tallies."""

from __future__ import annotations

import pytest

from rlhf.fact_drift import sampled_correct, training_question

QUESTIONS = ["Why is the sky blue?", "What is the capital of France?"]


def served(message: str) -> str:
    return (f"<|im_start|>system\nYou are Colloquy.<|im_end|>\n<|im_start|>user\n{message}<|im_end|>\n"
            "<|im_start|>assistant\n")


def test_the_question_is_found_under_the_templates_reminder_and_without_its_question_mark() -> None:
    assert training_question(served("Why is the sky blue?\n\n(Answer this message directly and briefly.)"),
                       QUESTIONS) == "Why is the sky blue?"
    assert training_question(served("what is the capital of france"), QUESTIONS) == "What is the capital of France?"
    assert training_question(served("Tell me a joke."), QUESTIONS) is None


def test_every_ranked_answer_and_each_rankings_best_are_tallied_per_version() -> None:
    rows = [
        {"kind": "ranking", "model_version": "v1", "prompt": served("What is the capital of France?"),
         "answers": ["I like bread.", "The capital of France is Paris."], "ranking": [1, 0]},
        {"kind": "rating", "model_version": "v1", "prompt": served("What is the capital of France?"),
         "answers": ["Paris."], "ranking": []},
        {"kind": "ranking", "model_version": "v1", "prompt": served("Tell me a joke."),
         "answers": ["No.", "Why not."], "ranking": [0, 1]},
    ]
    tally = sampled_correct(rows, QUESTIONS)
    every, best = tally["v1"]["What is the capital of France?"]
    assert every == pytest.approx([0.0, 1.0]) and best == pytest.approx([1.0])
    assert list(tally["v1"]) == ["What is the capital of France?"]
