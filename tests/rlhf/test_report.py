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
