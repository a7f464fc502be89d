"""The evaluation's pure pieces: the served prompt layout, the rule's verdicts, the KL estimate."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf import evaluation, preference


def test_served_prompt_matches_what_the_prompt_service_stored() -> None:
    # A prompt exactly as the feedback dataset holds it (first turn of a conversation, template v5,
    # the served one).
    stored = ("<|im_start|>system\nYou are a helpful AI assistant named Colloquy. Answer clearly and briefly, "
              "and use what the user told you earlier in the conversation.<|im_end|>\n<|im_start|>user\n"
              "Hello, what is the capital of Italy?\n\n(Answer this message directly and briefly.)"
              "<|im_end|>\n<|im_start|>assistant\n")
    prompts, version = evaluation.served_prompts(["Hello, what is the capital of Italy?"])
    assert version == "v5"
    assert prompts == [stored]


def test_served_prompt_placements() -> None:
    assert evaluation.served_prompt("Q?", "S") == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\n")
    assert evaluation.served_prompt("Q?", "S", "R", "system") == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ?<|im_end|>\n"
        "<|im_start|>system\nR<|im_end|>\n<|im_start|>assistant\n")


def test_judge_counts_wins_ties_losses() -> None:
    table = {"a": 1.0, "b": 2.0, "c": 0.5}
    result = evaluation.judge(["q1", "q2", "q3"], ["a", "a", "b"], ["b", "a", "c"], lambda q, a: table[a])
    assert (result["child_wins"], result["ties"], result["child_losses"]) == (1, 1, 1)
    assert result["parent_score_mean"] == pytest.approx((1 + 1 + 2) / 3)
    assert result["child_score_mean"] == pytest.approx((2 + 1 + 0.5) / 3)
    assert result["parent_scores"] == [1.0, 1.0, 2.0]


def test_judge_with_the_rule_prefers_a_finished_on_topic_answer() -> None:
    q = "Why is the ocean salty?"
    result = evaluation.judge([q], ["well well well well well well"], ["The ocean is salty from rocks."],
                              preference.score)
    assert result["child_wins"] == 1


def test_judge_counts_the_answers_at_the_rules_highest_score() -> None:
    questions = ["What is the capital of Italy?", "What is the capital of France?"]
    parent = ["The capital of Italy is Rome.", "The capital of France is Paris, a city on the river"]
    child = ["The capital of Italy is Rome.", "The capital of France is Paris."]
    result = evaluation.judge(questions, parent, child, preference.score, best=preference.best_score)
    assert result["at_best"] == {"parent": 1, "child": 2}
    assert (result["child_wins"], result["ties"]) == (1, 1)  # the parent's best answer could only be tied
    assert "at_best" not in evaluation.judge(questions, parent, child, preference.score)


def test_judge_of_nothing() -> None:
    result = evaluation.judge([], [], [], preference.score)
    assert result["prompts"] == 0 and result["parent_score_mean"] is None


def test_sequence_kl_sums_log_ratios_over_real_tokens() -> None:
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.1, -0.2, -9.0]])
    ref = torch.tensor([[-1.5, -2.0, -1.0], [-0.3, -0.2, -0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    # row 0: 0.5 + 0 + 0.5; row 1: 0.2 + 0 (the third token is padding)
    assert evaluation.sequence_kl(logp, ref, mask).tolist() == pytest.approx([1.0, 0.2])


def test_kl_summary_against_the_bound() -> None:
    summary = evaluation.kl_summary([1.0, 3.0], [10, 30], bound=2.5)
    assert summary["kl_per_answer"] == 2.0
    assert summary["kl_per_token"] == pytest.approx(4.0 / 40)
    assert summary["kl_per_answer_stderr"] == pytest.approx(math.sqrt(2.0 / 2))  # sample var 2, n 2
    assert summary["within_bound"] is True
    assert evaluation.kl_summary([3.0, 3.0], [1, 1], bound=2.5)["within_bound"] is False
    empty = evaluation.kl_summary([], [], bound=1.0)
    assert empty["kl_per_answer"] is None and empty["within_bound"] is False


def test_cut_off_answers_get_the_final_eos_the_reward_model_was_trained_with() -> None:
    from rlhf.train import response_mask, with_final_eos

    eos, pad = 9, 9
    # prompt [5, 6] (left padded in row 1), responses: ended at t=1; cut off after 3 tokens
    seq = torch.tensor([[5, 6, 1, eos, pad], [0, 5, 2, 3, 4]])
    attn_prompt = torch.tensor([[1, 1], [0, 1]])
    response = seq[:, 2:]
    rmask = response_mask(response, eos)
    assert rmask.tolist() == [[1, 1, 0], [1, 1, 1]]
    ids, attn = with_final_eos(seq, torch.cat([attn_prompt, rmask], 1), rmask, eos)
    assert ids.tolist() == [[5, 6, 1, eos, pad, eos], [0, 5, 2, 3, 4, eos]]
    assert attn.tolist() == [[1, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1]]


def test_judge_shows_each_term_of_the_rule_and_the_answer_length() -> None:
    # The gaming the term split exposes: a child that only got shorter and says nothing.
    q = "Why is the ocean salty?"
    parent = "The ocean is salty because rivers carry salt from rocks into the ocean over many years"
    child = "You're looking for a simple answer?"
    result = evaluation.judge([q], [parent], [child], preference.score, preference.terms)
    parts = result["rule_parts"]
    assert parts["parent"]["non_answer"] == 0.0 and parts["child"]["non_answer"] == 1.0
    assert parts["parent"]["on_topic"] == 1.0 and parts["child"]["on_topic"] == 0.0  # {ocean, salty}
    assert parts["child"]["full_stop"] == 1.0 and parts["parent"]["full_stop"] == 0.0
    assert (result["parent_words_mean"], result["child_words_mean"]) == (16, 6)
    assert result["child_losses"] == 1 and result["child_win_rate"] == 0.0
