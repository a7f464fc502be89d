"""The bench report of a real run: every figure the issue asks for reaches the JSON and the table."""

from __future__ import annotations

from rlhf import report


def test_summary_and_markdown() -> None:
    run = {"version": "child", "parent_version": "parent",
           "reward_model": {"reward_model_accuracy": 0.8, "heldout_pairs": 30, "reward_model_train_accuracy": 0.7,
                            "train_pairs": 100, "reward_offset": 0.1, "reward_model_seconds": 12.0},
           "ppo_history": [{"step": 1.0, "reward_mean": 0.1, "kl": 0.0, "entropy": 2.0, "clip_fraction": 0.0,
                            "approx_kl": 0.001, "value_loss": 0.5, "step_seconds": 30.0}],
           "evaluation": {"prompts": 3, "parent_score_mean": 1.0, "child_score_mean": 1.2, "child_wins": 2,
                          "ties": 1, "child_losses": 0, "greedy_reward_model": {"parent_mean": 0.0, "child_mean": 0.3},
                          "sampled": {"parent_rm_mean": 0.1, "child_rm_mean": 0.4},
                          "kl_to_parent": {"answers": 6, "kl_per_answer": 1.5, "kl_per_answer_stderr": 0.2,
                                           "kl_per_token": 0.05, "bound_per_answer": 6.0, "within_bound": True},
                          "seconds": {"greedy": 5.0}},
           "phase_seconds": {"reward_model": 12.0, "ppo": 30.0, "train": 50.0, "export": 20.0, "evaluate": 9.0}}
    labels = [{"ranking": [0, 2, 1, 3]}] * 5
    s = report.summary(run, labels, 100.0, "make rlhf-label", "2 cores")
    assert s["labelling"] == {"command": "make rlhf-label", "rankings": 5, "seconds": 100.0,
                              "candidates_per_prompt": 4}
    assert s["heldout"]["rule_greedy"]["child_wins"] == 2
    assert s["phase_seconds"]["ppo"] == 30.0 and s["phase_seconds"]["labelling"] == 100.0
    md = report.markdown(s)
    assert "2 wins / 1 ties / 0 losses" in md
    assert "1.500 ± 0.200 nats per answer" in md and "within bound = True" in md
    assert "| 1 | 0.100 | 0.000 | 2.000 |" in md


def _child(algorithm: str, version: str, wins: int, kl: float, words: float, train_s: float) -> dict:
    ev = {"prompts": 4, "parent_score_mean": 1.0, "child_score_mean": 1.5, "child_wins": wins, "ties": 0,
          "child_losses": 4 - wins, "child_win_rate": wins / 4, "parent_words_mean": 20.0, "child_words_mean": words,
          "kl_to_parent": {"kl_per_answer": kl, "bound_per_answer": 6.0, "within_bound": kl <= 6.0},
          "rule_parts": {"parent": dict.fromkeys(report.TERMS, 0.25), "child": dict.fromkeys(report.TERMS, 0.5)}}
    return {"algorithm": algorithm, "version": version, "evaluation": ev, "vs_origin": None,
            "phase_seconds": {"reward_model": 10.0, algorithm: train_s, "export": 2.0, "evaluate": 3.0,
                              "publish": 1.0}}


def test_job_markdown_rounds_and_ppo_vs_dpo() -> None:
    ppo = _child("ppo", "c-ppo", 3, 2.5, 12.0, 50.0)
    ppo["quality"] = {"fidelity": {"prompts": 4, "max_new_tokens": 64, "served_equals_fp32": 3},
                      "eight_bit_layers": [26, 27, 28, 29],
                      "gate": {"passed": False, "score_pct": 76.63, "parent_pct": 79.35, "points": 2.0}}
    one = {"round": 1, "parent_version": "base", "origin_version": "base", "label_seconds": 40.0,
           "labelled_version": "base",
           "reward_model": {"reward_model_accuracy": 0.75},
           "children": {"ppo": ppo, "dpo": _child("dpo", "c-dpo", 2, 7.0, 18.0, 20.0)}}
    md = report.job_markdown([one])
    rows = {line.split(" | ")[1]: line for line in md.splitlines() if line.startswith("| 1 |")}
    # round 1's parent is the first base: the wins against it are the wins against the parent
    assert "| 3/0/1 (0.75) | 3/0/1 (0.75) | 2.500 (within 6.0) | 2.500 (within 6.0) | 0.750 |" in rows["ppo"]
    assert "7.000 (OVER 6.0)" in rows["dpo"] and "20.0 -> 18.0" in rows["dpo"]
    assert "| 3/4; 8-bit layers 26-29 | 76.6 (parent 79.3): FAILED | base | 40 | 10 / 50 / 2 / 3 / 1 |" in rows["ppo"]
    assert "| - | - | base | 40 |" in rows["dpo"]  # an export not compared with its float32, nor gated
    assert "| non_answer | 0.250 | 0.500 |" in md
    assert "at the rule's highest score" not in md  # an older evaluation without the count
    ppo["evaluation"]["at_best"] = {"parent": 1, "child": 2}
    assert ("Round 1, ppo child: answers at the rule's highest score: parent 1/4, child 2/4; the child can win "
            "at most the other 3 (75% of the questions).") in report.job_markdown([one])
    table = md[md.index("PPO vs DPO"):]
    assert "| measure | ppo | dpo |" in table
    assert "| wins/ties/losses vs parent (win rate) | 3/0/1 (0.75) | 2/0/2 (0.50) |" in table
    assert "| training seconds (PPO or DPO, without the reward model) | 50.0 | 20.0 |" in table


def test_the_quiz_line_says_whether_validation_had_a_checkpoint_to_choose() -> None:
    from rlhf.report import training_quiz_line

    def record(passed: bool) -> dict:
        return {"parent": {"pct": 79.35}, "points": 1.5, "kept_step": 12 if passed else None,
                "checks": [{"step": 12, "pct": 79.0 if passed else 77.0, "passed": passed},
                           {"step": 24, "pct": 77.0, "passed": False}],
                "validation": {"questions": 32, "checks": [{"step": 12, "wins": 9, "ties": 20, "losses": 3},
                                                           {"step": 24, "wins": 17, "ties": 10, "losses": 5}]}}
    chosen = training_quiz_line(record(True))
    assert "kept step 12, not the last (24)" in chosen and "step 12 has the most wins among those within" in chosen
    none = training_quiz_line(record(False))
    assert "no checkpoint within the points: kept the last" in none and "none was within the points" in none
    assert "most wins" not in none


def test_the_quiz_line_says_whether_the_checkpoints_mean_was_kept() -> None:
    from rlhf.report import training_quiz_line

    def record(passed: bool) -> dict:
        return {"parent": {"pct": 79.35}, "points": 1.5, "kept_step": 24,
                "checks": [{"step": 12, "pct": 79.0, "passed": True}, {"step": 24, "pct": 79.0, "passed": True}],
                "average": {"of_steps": [12, 24], "instead_of": 24 if passed else None,
                            "quiz": {"pct": 79.9 if passed else 75.0, "passed": passed},
                            "validation": {"wins": 8, "ties": 20, "losses": 4}, "kept": passed}}
    kept = training_quiz_line(record(True))
    assert "The mean of the weights of steps 12, 24: quiz 79.9, validation 8/20/4; kept instead" in kept
    assert "kept the mean of the checkpoints' weights" in kept and "kept step" not in kept
    assert "(out); not kept." in training_quiz_line(record(False))


def test_the_quiz_line_names_each_extrapolation_and_the_factor_kept() -> None:
    from rlhf.report import training_quiz_line

    def record(kept_factor: float) -> dict:
        return {"parent": {"pct": 79.35}, "points": 1.5, "kept_step": 24,
                "checks": [{"step": 24, "pct": 79.0, "passed": True}],
                "extrapolation": {"kept_factor": kept_factor, "tried": [
                    {"factor": 1.0, "validation": {"step": 24, "wins": 15, "ties": 11, "losses": 6}, "passed": True},
                    {"factor": 2.5, "validation": {"step": 24, "wins": 19, "ties": 8, "losses": 5},
                     "quiz": {"pct": 78.26}, "passed": True},
                    {"factor": 3.0, "validation": {"step": 24, "wins": 21, "ties": 8, "losses": 3},
                     "quiz": {"pct": 76.63}, "passed": False}]}}
    line = training_quiz_line(record(2.5))
    assert "x 1 15/11/6, x 2.5 19/8/5 quiz 78.3, x 3 21/8/3 quiz 76.6 (out); kept x 2.5." in line
    assert "kept the weights as trained." in training_quiz_line(record(1.0))
