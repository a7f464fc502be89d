"""The whole offline loop on the tiny model, for real: Parquet feedback -> reward model -> PPO and
DPO on Ray Train -> ONNX export -> new registry versions that onnxruntime_genai loads and runs;
then two rounds that build on each other."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from model.quality import QUESTIONS
from model.registry import Registry
from rlhf import data, job, preference
from rlhf.config import load_config
from rlhf.report import TERMS as REPORT_TERMS
from rlhf.report import job_markdown as report_markdown
from rlhf.validation import ValidationCheck, best_step
from services.feedback.dataset import write_rows
from tests.rlhf.synthetic import base_row, candidates, questions, ranking_rows

pytestmark = pytest.mark.ray  # Ray Train on a local Ray

NOW_MS = 1_800_000_000_000


@pytest.fixture(scope="module")
def tiny_registry(tmp_path_factory: pytest.TempPathFactory) -> tuple[Registry, str]:
    """A temp registry whose generation pointer serves the tiny random model."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from model.tiny import cached_tiny_model, publish_tiny

    root = tmp_path_factory.mktemp("registry")
    version = publish_tiny(root, cached_tiny_model())
    registry = Registry(root)
    registry.set_current("generation", version)
    return registry, version


def test_offline_loop_publishes_a_child_version(tiny_registry: tuple[Registry, str], tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    registry, base = tiny_registry
    monkeypatch.setenv("COLLOQUY_CACHE", str(tmp_path / "cache"))
    feedback = tmp_path / "feedback"
    qs = questions("train")
    rows = ranking_rows(qs, NOW_MS - 100_000)
    # Ratings: one prompt rated up and down (a pair), one lone rating (dropped), and one row from
    # after the window (ignored) -- all through the sink's own writer.
    q = qs[0]
    answers = candidates(q)
    rows += [base_row(q, NOW_MS - 500, kind="rating", answers=answers, rating_answer_index=2, thumbs_up=True),
             base_row(q, NOW_MS - 400, kind="rating", answers=answers, rating_answer_index=0, thumbs_up=False),
             base_row(qs[1], NOW_MS - 300, kind="rating", answers=candidates(qs[1]), rating_answer_index=1,
                      thumbs_up=True),
             base_row(qs[2], NOW_MS + 1, kind="ranking", answers=candidates(qs[2]), ranking=[0, 1, 2])]
    write_rows(feedback, rows, partition=0, first_offset=0, last_offset=len(rows) - 1)
    # Logged turns for the replay evaluation: two in its hour, one before it (not replayed).
    from services.conversation.db import ConversationDB
    from tests.conversation.records import Feeder, record

    store = f"sqlite:///{tmp_path / 'conversations.db'}"
    db = ConversationDB(store)
    db.migrate()
    Feeder(db).put(*[record(f"c{i}", "ann", 1, qs[i], created_ms=NOW_MS - ms, prompt=f"<|im_start|>user\n{qs[i]}")
                     for i, ms in enumerate((60_000, 120_000, 7_200_000))])
    db.close()

    config = load_config(rm_epochs=4, rm_batch_size=4, rm_lr=2e-3, ppo_steps=3, rollout_batch_size=4,
                         ppo_epochs=2, minibatch_size=2, lr=1e-4, max_new_tokens=12, checkpoint_every=1,
                         heldout_percent=25, num_workers=2, cpus_per_worker=1, ray_num_cpus=2, use_gpu="false",
                         eval_max_new_tokens=8, eval_samples=1, kl_bound=1e6, pushgateway_url="",
                         algorithm="both", dpo_epochs=2, dpo_batch_size=4, dpo_lr=1e-3, dpo_quiz_every=2,
                         dpo_select="validation", dpo_extrapolate="2",
                         replay=True, replay_hours=1, replay_store=store, moderation_addr="")
    report = job.run(config, registry, dataset_root=feedback, now_ms=NOW_MS)
    assert list(report["children"]) == ["ppo", "dpo"] and report["version"] == report["children"]["ppo"]["version"]

    version = report["version"]
    manifest = registry.load(version).manifest  # checksums verified
    assert manifest["parent_version"] == base
    assert manifest["source"] == "rlhf"
    training = manifest["training"]
    assert training["feedback_window"] == {"since_ms": 0, "until_ms": NOW_MS}
    assert training["dataset"]["rankings"] == len(qs)  # the ranking after the window is not read
    assert training["dataset"]["ratings_paired"] == 2 and training["dataset"]["ratings_dropped"] == 1
    rm = training["reward_model"]
    assert rm["heldout_pairs"] >= 9
    # Chance is 0.5; the rule (concise, on topic, full stop, no repetition) is learnable.
    assert rm["reward_model_accuracy"] >= 0.75, rm
    history = training["ppo"]["history"]
    assert [h["step"] for h in history] == [1.0, 2.0, 3.0]
    for key in ("reward_mean", "kl", "entropy", "clip_fraction", "value_loss", "policy_loss", "approx_kl"):
        assert all(isinstance(h[key], float) for h in history), key
    assert history[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # the first rollout comes from the reference itself
    evaluation = training["evaluation"]
    assert evaluation["prompts"] == len(questions("heldout"))
    assert evaluation["child_wins"] + evaluation["ties"] + evaluation["child_losses"] == evaluation["prompts"]
    kl = evaluation["kl_to_parent"]
    assert kl["answers"] == len(questions("heldout")) and kl["kl_per_answer"] is not None and kl["within_bound"]
    for key in ("parent_rm_mean", "child_rm_mean", "parent_rule_mean", "child_rule_mean"):
        assert isinstance(evaluation["sampled"][key], float), key
    assert isinstance(evaluation["greedy_reward_model"]["child_mean"], float)
    # Replayed before publishing: the logged prompts, child vs the served version, in the manifest.
    replayed = training["replay"]
    assert replayed["prompts"] == 2 and replayed["served_version"] == base and report["replay"] == replayed
    assert replayed["rule"]["candidate_wins"] + replayed["rule"]["ties"] + replayed["rule"]["candidate_losses"] == 2
    assert isinstance(replayed["reward"]["candidate_mean"], float)
    assert replayed["moderation"]["candidate_block_rate"] is None and not replayed["passed"]
    assert replayed["reasons"] == ["moderation block rate not measured: not configured (MODERATION_ADDR is empty)"]
    assert registry.current("generation") == base  # promotion is a separate command

    # The child loads and generates through onnxruntime_genai, and differs from its parent.
    from model.genai import chat, load

    model, tokenizer = load(registry.version_path(version), "cpu")
    out = chat(model, tokenizer, [{"role": "user", "content": "What is the capital of Italy?"}], 8)
    assert out.new_tokens >= 1
    assert (registry.version_path(version) / "hf" / "model.safetensors").is_file()
    parent_onnx = (registry.version_path(base) / "model.onnx.data").read_bytes()
    assert (registry.version_path(version) / "model.onnx.data").read_bytes() != parent_onnx

    # DPO on the same comparisons: a second child of the same parent, judged on the same prompts.
    dpo_child = report["children"]["dpo"]
    dpo_manifest = registry.load(dpo_child["version"]).manifest
    assert dpo_child["version"] != version and dpo_manifest["parent_version"] == base
    assert dpo_manifest["training"]["algorithm"] == "dpo"
    dpo_history = dpo_manifest["training"]["dpo"]["history"]
    # The first step's policy is the reference itself: every pair's loss is log 2.
    assert dpo_history[0]["dpo_loss"] == pytest.approx(math.log(2), abs=1e-4)
    last_epoch = [h["dpo_loss"] for h in dpo_history if h["epoch"] == 2.0]
    assert last_epoch and sum(last_epoch) / len(last_epoch) < math.log(2), dpo_history
    assert dpo_manifest["training"]["dpo"]["heldout"]["dpo_heldout_pairs"] == rm["heldout_pairs"]
    # The quiz scored the parent, then the policy every 2 steps and after the last; the run kept a
    # checkpoint that passed or, failing every one, its last weights.
    quiz = dpo_manifest["training"]["dpo"]["quiz"]
    assert quiz["parent"]["total"] == len(QUESTIONS) and quiz["points"] == 1.5
    steps = [c["step"] for c in quiz["checks"]]
    assert steps[-1] == len(dpo_history) and steps[:-1] == list(range(2, len(dpo_history), 2))[:len(steps) - 1]
    assert quiz["kept_step"] in ({c["step"] for c in quiz["checks"] if c["passed"]} or {None})
    # The same checkpoints answered the validation questions (both workers' shares added up), and
    # the kept one is the passing checkpoint with most rule wins against the parent.
    assert quiz["select"] == "validation" and quiz["validation"]["questions"] == len(questions("validation"))
    scored = [ValidationCheck(**c) for c in quiz["validation"]["checks"]]
    assert [c.step for c in scored] == steps
    assert all(c.wins + c.ties + c.losses == len(questions("validation")) for c in scored)
    assert quiz["kept_step"] == best_step([c["step"] for c in quiz["checks"] if c["passed"]], scored)
    # RLHF_DPO_EXTRAPOLATE: the kept weights and the parent + 2 x (kept - parent) were scored (and the
    # latter quizzed) on the validation questions; the report says which was published
    expo = quiz.get("extrapolation")
    assert (expo is not None) == (quiz["kept_step"] is not None), quiz
    if expo:
        assert [t["factor"] for t in expo["tried"]] == [1.0, 2.0] and expo["kept_factor"] in (1.0, 2.0)
        assert all(sum(t["validation"].values()) - t["validation"]["step"] == len(questions("validation"))
                   and t["validation"]["step"] == quiz["kept_step"] for t in expo["tried"])
    # "steps" and "final" describe the published (kept) weights, the history the whole run
    dpo_training = dpo_manifest["training"]["dpo"]
    assert dpo_training["trained_steps"] == len(dpo_history)
    assert dpo_training["steps"] == (quiz["kept_step"] or len(dpo_history))
    assert dpo_training["final"] == dpo_history[dpo_training["steps"] - 1]
    assert dpo_child["training_quiz"] == quiz
    dpo_eval = dpo_child["evaluation"]
    assert dpo_eval["prompts"] == evaluation["prompts"] and dpo_eval["kl_to_parent"]["answers"] == kl["answers"]
    assert set(dpo_eval["rule_parts"]["child"]) == set(REPORT_TERMS) == set(preference.terms("q", "a"))
    assert (registry.version_path(dpo_child["version"]) / "model.onnx.data").read_bytes() != parent_onnx
    md = report_markdown([report])
    assert "PPO vs DPO" in md and dpo_child["version"] in md and "non_answer" in md and "Replay FAILED" in md
    assert "quiz during training" in md and "validation questions" in md
    assert ("Extrapolated from the parent (ExPO" in md) == bool(expo)

    # The next run from the child starts where this window ended: only the late ranking is new,
    # too little to train on, so nothing is published.
    assert data.window_since(manifest) == NOW_MS
    with pytest.raises(job.JobError, match="only 1 training comparisons"):
        job.run(config, registry, base=version, dataset_root=feedback, now_ms=NOW_MS + 10)
    run_state = json.loads((tmp_path / "cache" / "rlhf" / "runs" / f"{base}-all" / "run.json").read_text())
    assert run_state["status"] == "published" and run_state["version"] == version
    assert preference.score(q, answers[2]) > preference.score(q, answers[0])


@pytest.mark.timeout(600)  # two whole rounds; about 3 minutes on 2 busy cores
def test_two_rounds_build_on_each_other(tiny_registry: tuple[Registry, str], tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """``--rounds 2``: round 2 trains from round 1's child on feedback newer than round 1's window
    only, and judges its child against round 1's child and against the first base. Smallest
    settings: DPO only (with the NLL term), 24 labelled questions, 6 held-out ones."""
    registry, base = tiny_registry
    monkeypatch.setenv("COLLOQUY_CACHE", str(tmp_path / "cache"))
    held = questions("heldout")[:6]
    monkeypatch.setattr(job, "heldout_prompts", lambda: held)
    feedback = tmp_path / "feedback"
    qs = questions("train")[:24]
    first = ranking_rows(qs[:16], NOW_MS - 100_000)
    write_rows(feedback, first, partition=0, first_offset=0, last_offset=len(first) - 1)
    later = NOW_MS + 60_000
    labelled: list[tuple[int, str]] = []

    def label(k: int, version: str) -> None:
        """The labelers of round k: round 2's rankings arrive after round 1's window ended."""
        labelled.append((k, version))
        if k == 2:
            rows = ranking_rows(qs[16:], NOW_MS + 1_000)
            write_rows(feedback, rows, partition=1, first_offset=0, last_offset=len(rows) - 1)

    ends = iter([NOW_MS, later])
    config = load_config(algorithm="dpo", rm_epochs=1, rm_batch_size=8, rm_lr=2e-3, dpo_epochs=1, dpo_batch_size=8,
                         dpo_lr=1e-3, dpo_nll=1.0, dpo_anchor=1.0, dpo_quiz_every=1, dpo_average=True,
                         max_new_tokens=8, heldout_percent=25, num_workers=1, cpus_per_worker=2, ray_num_cpus=2,
                         use_gpu="false", eval_max_new_tokens=8, eval_samples=1, kl_bound=1e6, pushgateway_url="")
    reports = job.run_rounds(config, registry, 2, base=base, dataset_root=feedback, label=label,
                             clock=lambda: next(ends))

    one, two = reports
    assert labelled == [(1, base), (2, one["version"])]
    assert (one["parent_version"], two["parent_version"]) == (base, one["version"])
    assert one["feedback_window"] == {"since_ms": 0, "until_ms": NOW_MS}
    assert two["feedback_window"] == {"since_ms": NOW_MS, "until_ms": later}
    assert (one["dataset"]["rankings"], two["dataset"]["rankings"]) == (16, 8)  # round 1's is not read again
    assert one["vs_origin"] is None  # round 1's parent is the first base
    vs_origin = two["vs_origin"]
    assert vs_origin["origin_version"] == base and vs_origin["prompts"] == len(held)
    assert vs_origin["kl_to_parent"]["kl_per_answer"] is not None  # KL of round 2's child to the first base
    for report in reports:
        assert report["reward_model"]["reward_model_accuracy"] is not None
        assert report["evaluation"]["child_words_mean"] is not None
        assert {"reward_model", "dpo", "export", "evaluate", "publish"} <= set(
            report["children"]["dpo"]["phase_seconds"])
    assert registry.load(two["version"]).manifest["training"]["vs_origin"]["origin_version"] == base
    # RLHF_DPO_NLL: the best answers' NLL per token was added (and watched) at every step
    assert two["hyperparameters"]["dpo_nll"] == 1.0
    assert two["dpo_history"] and all(h["dpo_nll"] > 0 for h in two["dpo_history"]), two["dpo_history"]
    # RLHF_DPO_ANCHOR: KL to the parent on its anchor answers, 0 at the first step (the policy is the
    # parent) and above it once the policy has moved
    kls = [[h["dpo_anchor_kl"] for h in r["dpo_history"]] for r in reports]
    assert all(k[0] == pytest.approx(0.0, abs=1e-5) for k in kls) and max(kls[0]) > 1e-4, kls
    assert "KL to the parent on the anchor questions x 1.0" in registry.load(two["version"]).manifest["training"][
        "method"]
    # RLHF_DPO_AVERAGE: the mean of every checked step's weights was quizzed after the last step, and
    # kept (the published run is then the whole history) exactly when it passed; a run of one step
    # (round 2 here: 8 comparisons, a batch of 8) has no mean to take
    quizzes = [r["children"]["dpo"]["training_quiz"] for r in reports]
    assert [len(q["checks"]) for q in quizzes] == [2, 1]
    mean = quizzes[0]["average"]
    assert mean["of_steps"] == [1, 2] and mean["kept"] == mean["quiz"]["passed"]
    assert quizzes[0]["kept_step"] == 2 if mean["kept"] else "instead_of" not in mean
    assert "average" not in quizzes[1]
    md = report_markdown(reports)
    assert one["version"] in md and two["version"] in md and "The mean of the weights of steps" in md
