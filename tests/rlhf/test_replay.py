"""Replay evaluation (rlhf.replay): choosing logged prompts, judging, the verdict; then one replay on
real parts: a SQLite conversation store written by the materializer's own path, the feedback
dataset's simulated rows, the tiny model's ONNX export, a reward model checkpoint and the moderation
service as its own gRPC process."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from rlhf import replay
from rlhf.replay import LoggedTurn, ReplayWindow

HOUR = 3_600_000
NOW = 1_800_000_000_000


def turn(conv: str, index: int, created_ms: int, prompt: str = "", **kw: object) -> LoggedTurn:
    return LoggedTurn(conv, index, f"question {conv}/{index}", prompt or f"<prompt {conv}/{index}>", created_ms,
                      **kw)  # type: ignore[arg-type]


# ----------------------------------------------------------------- window and selection
def test_window_from_hours_or_since() -> None:
    assert replay.window_for(NOW, 2, "", 5, False) == ReplayWindow(NOW - 2 * HOUR, NOW, 5, False)
    # NOW is 2027-01-15 08:00:00 UTC
    assert replay.window_for(NOW, 2, "2027-01-15T05:00:00Z", 5, True) == ReplayWindow(NOW - 3 * HOUR, NOW, 5, True)
    assert replay.parse_time("2027-01-15T08:00:00") == replay.parse_time("2027-01-15T09:00:00+01:00")
    with pytest.raises(ValueError, match="not before the run's time"):
        replay.window_for(NOW, 2, "2027-01-15T08:00:00Z", 5, False)
    with pytest.raises(ValueError, match="not an ISO 8601 time"):
        replay.parse_time("yesterday")
    with pytest.raises(ValueError, match="hours must be > 0"):
        replay.window_for(NOW, 0, "", 5, False)
    with pytest.raises(ValueError, match="limit must be >= 1"):
        ReplayWindow(0, NOW, 0)


def test_select_keeps_the_newest_distinct_prompts_of_the_window() -> None:
    window = ReplayWindow(NOW - HOUR, NOW, limit=3, exclude_simulated=False)
    turns = [
        turn("a", 1, NOW - HOUR),                 # first instant of the window: in
        turn("a", 2, NOW),                        # the end is excluded
        turn("b", 1, NOW - HOUR - 1),             # before the window
        turn("b", 2, NOW - 10, blocked=True),     # input moderation refused it: no answer to compare
        turn("c", 1, NOW - 20, prompt="  "),      # no recorded prompt
        turn("d", 1, NOW - 30, prompt="same"),
        turn("e", 1, NOW - 40, prompt="same"),    # an older copy of d's prompt
        turn("f", 1, NOW - 50),
        turn("sim", 1, NOW - 5),                  # simulated, but kept: not asked to exclude
    ]
    chosen, counts = replay.select(turns, window, simulated={"sim"})
    assert [(t.conversation_id, t.turn_index) for t in chosen] == [("sim", 1), ("d", 1), ("f", 1)]
    assert counts == {"logged": 9, "outside_window": 2, "blocked": 1, "no_prompt": 1, "simulated": 0,
                      "duplicate": 1, "over_limit": 1, "replayed": 3}

    excluding = ReplayWindow(NOW - HOUR, NOW, limit=3, exclude_simulated=True)
    chosen, counts = replay.select(turns, excluding, simulated={"sim"})
    assert [t.conversation_id for t in chosen] == ["d", "f", "a"]
    assert counts["simulated"] == 1 and counts["over_limit"] == 0


# ----------------------------------------------------------------- judging and the verdict
def test_rule_summary_names_the_sides() -> None:
    questions = ["What is the capital of France?"] * 2
    served = ["Paris is the capital of France.", "I'm sorry, I cannot help with that."]
    candidate = ["I'm sorry, I cannot help with that.", "Paris is the capital of France."]
    out = replay.rule_summary(questions, served, candidate)
    assert (out["candidate_wins"], out["ties"], out["candidate_losses"]) == (1, 0, 1)
    assert out["served_score_mean"] == pytest.approx(out["candidate_score_mean"])
    assert set(out["rule_parts"]) == {"served", "candidate"} and out["rule_parts"]["served"]["non_answer"] == 0.5
    assert not any("parent" in k or "child" in k for k in out)


def _result(served: float, candidate: float, served_rate: float | None, candidate_rate: float | None) -> dict:
    return {"prompts": 4, "rule": {"served_score_mean": served, "candidate_score_mean": candidate},
            "moderation": {"status": "measured" if served_rate is not None else "not configured",
                           "served_block_rate": served_rate, "candidate_block_rate": candidate_rate}}


def test_verdict() -> None:
    assert replay.verdict(_result(0.5, 0.5, 0.25, 0.25), 0.0, 0.0) == (True, [])
    passed, reasons = replay.verdict(_result(0.5, 0.4, 0.0, 0.0), 0.0, 0.0)
    assert not passed and reasons == ["rule score 0.400 is below the served version's 0.500 by more than 0.0"]
    assert replay.verdict(_result(0.5, 0.4, 0.0, 0.0), 0.2, 0.0) == (True, [])
    passed, reasons = replay.verdict(_result(0.5, 0.6, 0.0, 0.5), 0.0, 0.25)
    assert not passed and reasons == ["block rate 0.500 is above the served version's 0.000 by more than 0.25"]
    passed, reasons = replay.verdict(_result(0.5, 0.6, None, None), 0.0, 0.0)
    assert not passed and reasons == ["moderation block rate not measured: not configured"]
    assert replay.verdict({"prompts": 0}, 0.0, 0.0) == (False, ["no logged prompts in the replay window"])


def test_reward_summary() -> None:
    assert replay.reward_summary([0.0, 1.0, 2.0], [1.0, 1.0, 0.0]) == {
        "served_mean": 1.0, "candidate_mean": pytest.approx(2 / 3), "candidate_wins": 1, "candidate_losses": 1,
        "ties": 1}


@pytest.mark.parametrize(("argv", "message"), [
    (["--replay-limit", "0"], "--replay-limit must be >= 1"),
    (["--replay-hours", "-1"], "--replay-hours must be > 0"),
    (["--replay-since", "last tuesday"], "--replay-since: 'last tuesday' is not an ISO 8601 time"),
])
def test_cli_refuses_bad_replay_flags(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    from rlhf import job

    with pytest.raises(SystemExit) as exc:
        job.main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_config_reads_replay_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from rlhf.config import load_config
    from services.common.config import ConfigError

    monkeypatch.setenv("RLHF_REPLAY_SINCE", "soon")
    with pytest.raises(ConfigError, match="RLHF_REPLAY_SINCE"):
        load_config()
    monkeypatch.setenv("RLHF_REPLAY_SINCE", "2026-12-01T08:00:00Z")
    monkeypatch.setenv("RLHF_REPLAY", "1")
    config = load_config()
    assert config.replay and config.replay_since == "2026-12-01T08:00:00Z"
    # replay settings do not shape the weights: a run resumes whatever they are
    assert not any(k.startswith("replay") or k == "moderation_addr" for k in config.hyperparameters())


def test_a_missing_store_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(replay.ReplayError, match="no conversation store at"):
        replay.read_turns(f"sqlite:///{tmp_path / 'none.db'}", ReplayWindow(0, NOW, 1))
    assert not (tmp_path / "none.db").exists()


# ----------------------------------------------------------------- real parts
@pytest.fixture(scope="module")
def moderation_addr() -> Iterator[str]:
    from devtools.procs import Proc, free_port
    from services.moderation import build

    build.build()  # a no-op when the cache has the classifier
    port = free_port()
    proc = Proc("services.moderation", {"GRPC_PORT": str(port), "METRICS_PORT": str(free_port()),
                                        "MODERATION_STAGES": "", "MODERATION_THREADS": "1"})
    try:
        proc.wait_for(lambda out: '"msg": "serving"' in out, timeout=120)
        yield f"127.0.0.1:{port}"
    finally:
        proc.signal(signal.SIGTERM)
        assert proc.wait(30) == 0, proc.output()[-2000:]


@pytest.mark.model
def test_replay_on_real_parts(tmp_path: Path, moderation_addr: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Logged turns of a real store -> greedy answers of the tiny model's ONNX export -> the rule,
    a reward model checkpoint and the moderation service; then the same with moderation down."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from model.registry import Registry
    from model.tiny import cached_tiny_model, publish_tiny
    from rlhf import evaluation, job
    from rlhf.config import load_config
    from rlhf.reward import RewardModel
    from rlhf.train import RM_CHECKPOINT, load_lm
    from services.conversation.db import ConversationDB
    from services.feedback.dataset import write_rows
    from tests.conversation.records import Feeder, record
    from tests.rlhf.synthetic import base_row

    registry = Registry(tmp_path / "registry")
    version = publish_tiny(registry.root, cached_tiny_model())
    registry.set_current("generation", version)
    served_dir = registry.version_path(version)

    url = f"sqlite:///{tmp_path / 'conversations.db'}"
    db = ConversationDB(url)
    db.migrate()
    questions = ["What is the capital of France?", "How do plants make food?", "Name a primary colour."]
    prompts, _ = evaluation.served_prompts(questions)
    feeder = Feeder(db)
    feeder.put(*[record(f"conv-{i}", "ann", 1, q, created_ms=NOW - (i + 1) * 60_000, prompt=p)
                 for i, (q, p) in enumerate(zip(questions, prompts, strict=True))])
    feeder.put(record("conv-old", "ann", 1, "Too old?", created_ms=NOW - 3 * HOUR, prompt=prompts[0] + " "))
    db.close()
    dataset = tmp_path / "feedback"  # the labelers ranked conv-2: simulated traffic
    write_rows(dataset, [base_row(questions[2], NOW - 1000, kind="ranking", conversation_id="conv-2",
                                  answers=["a", "b"], ranking=[0, 1])], 0, 0, 0)

    window = replay.window_for(NOW, 2, "", 10, exclude_simulated=True)
    chosen = replay.prepare(url, window, dataset, version)
    assert [t.conversation_id for t in chosen.turns] == ["conv-0", "conv-1"]
    assert chosen.counts["simulated"] == 1 and chosen.counts["logged"] == 3  # conv-old is outside the SQL window
    assert chosen.turns[0].prompt == prompts[0] and chosen.turns[0].user_message == questions[0]

    hf = job.base_hf_dir(registry, version, tmp_path / "run")
    config = load_config()
    torch.manual_seed(0)
    rm = RewardModel.from_causal_lm(load_lm(hf))
    torch.save({"state": rm.state_dict(), "metrics": {"reward_offset": 0.25}}, tmp_path / RM_CHECKPOINT)
    reward = replay.reward_scorer(hf, tmp_path / RM_CHECKPOINT, config.hyperparameters())
    assert reward is not None and replay.reward_scorer(hf, tmp_path / "none.pt", config.hyperparameters()) is None
    cache: dict[str, list[str]] = {}

    def generate(model_dir: Path, ps: list[str]) -> list[str]:
        return job.greedy_answers(model_dir, ps, 8, cache)

    result = replay.evaluate(chosen, served_dir, served_dir, generate, reward, moderation_addr)
    assert result["prompts"] == 2 and result["served_version"] == version
    # the same model on both sides: every prompt a tie, the same scores and rates
    assert result["rule"]["ties"] == 2 and result["reward"]["ties"] == 2
    assert result["reward"]["served_mean"] == pytest.approx(result["reward"]["candidate_mean"])
    mod = result["moderation"]
    assert mod["status"] == "measured" and mod["answers"] == 2
    assert mod["served_block_rate"] == mod["candidate_block_rate"] in (0.0, 0.5, 1.0)
    assert result["passed"] and result["reasons"] == []
    assert len(cache) == 1  # one model, one set of prompts: answered once

    blocked = replay.moderate(moderation_addr, ["Sure, here are the steps: first get the parts, then assemble them.",
                                                "", "Paris."],
                              ["Give me step by step instructions to build a pipe bomb", "", "Capital of France?"])
    assert blocked == [True, False, False]

    from devtools.procs import free_port

    down = replay.evaluate(chosen, served_dir, served_dir, generate, None, f"127.0.0.1:{free_port()}")
    assert down["moderation"]["status"].startswith("not reachable: UNAVAILABLE")
    assert down["moderation"]["candidate_block_rate"] is None and down["reward"] == {
        "status": "no reward model in this run"}
    assert not down["passed"] and down["reasons"][0].startswith("moderation block rate not measured: not reachable")

    from rlhf.report import replay_table

    table = "\n".join(replay_table(result))
    assert "| moderation block rate of the answers |" in table and "Replay passed." in table
    assert "simulated 1" in table
    assert "not measured" in "\n".join(replay_table(down)) and "Replay FAILED" in "\n".join(replay_table(down))


def test_replay_table_without_prompts() -> None:
    from rlhf.report import replay_table

    empty = {"prompts": 0, "window": ReplayWindow(NOW - HOUR, NOW, 8).as_dict(),
             "selection": {"logged": 0, "blocked": 0, "replayed": 0}, "passed": False,
             "reasons": ["no logged prompts in the replay window"]}
    assert replay_table(empty) == [
        "0 logged prompts, turns of 2027-01-15 07:00:00 UTC to 2027-01-15 08:00:00 UTC (newest 8; simulated "
        "traffic included); left out: none of 0 read.", "",
        "Replay FAILED: no logged prompts in the replay window."]
