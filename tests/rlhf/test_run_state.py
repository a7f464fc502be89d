"""An interrupted run resumes with its own feedback window; a finished one starts the next window."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import pytest

from model.registry import Registry
from rlhf import job
from rlhf.config import load_config
from rlhf.export import export_settings


@pytest.fixture
def registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Registry:
    monkeypatch.setenv("COLLOQUY_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "src"
    src.mkdir()
    (src / "model.onnx").write_bytes(b"not a model")
    reg = Registry(tmp_path / "registry")
    reg.publish(src, "base", source="test", precision="fp32", execution_provider="cpu")
    reg.publish(src, "child", source="rlhf", precision="fp32", execution_provider="cpu", parent_version="base",
                training={"feedback_window": {"since_ms": 0, "until_ms": 500}})
    return reg


def test_unfinished_run_resumes_with_its_window(registry: Registry) -> None:
    config = load_config()
    run_dir, state = job.prepare_run(registry, "base", config, fresh=False, now_ms=100)
    assert state["feedback_window"] == {"since_ms": 0, "until_ms": 100}
    (run_dir / "ppo.pt").write_bytes(b"checkpoint")
    # Interrupted, run again later: same window, checkpoints kept.
    again, state = job.prepare_run(registry, "base", config, fresh=False, now_ms=200)
    assert again == run_dir and state["feedback_window"]["until_ms"] == 100
    assert (run_dir / "ppo.pt").exists()
    # Other hyperparameters or --fresh: a new run from scratch with a new window.
    _, state = job.prepare_run(registry, "base", dataclasses.replace(config, lr=0.5), fresh=False, now_ms=300)
    assert state["feedback_window"]["until_ms"] == 300 and not (run_dir / "ppo.pt").exists()
    _, state = job.prepare_run(registry, "base", dataclasses.replace(config, lr=0.5), fresh=True, now_ms=400)
    assert state["feedback_window"]["until_ms"] == 400


def test_published_run_is_not_resumed_and_a_child_continues_its_window(registry: Registry) -> None:
    config = load_config()
    run_dir, state = job.prepare_run(registry, "base", config, fresh=False, now_ms=100)
    (run_dir / "run.json").write_text(json.dumps({**state, "status": "published", "version": "x"}))
    _, state = job.prepare_run(registry, "base", config, fresh=False, now_ms=200)
    assert state["feedback_window"] == {"since_ms": 0, "until_ms": 200}
    _, state = job.prepare_run(registry, "child", config, fresh=False, now_ms=900)
    assert state["feedback_window"] == {"since_ms": 500, "until_ms": 900}


def test_version_name_and_export_settings() -> None:
    from rlhf.data import FeedbackWindow

    name = job.version_name("smollm2-135m-cpu-int4-rtn-last-pruned-7b6c6e6b7f8e-rlhf-20260101T000000Z-aaaa",
                            FeedbackWindow(0, 1_800_000_000_000), "f6218015deadbeef")
    assert name == "smollm2-135m-cpu-int4-rtn-last-pruned-7b6c6e6b7f8e-rlhf-20270115T080000Z-f6218015"
    manifest = {"precision": "int4", "execution_provider": "cpu",
                "build": {"builder": {"precision": "int4", "execution_provider": "cpu",
                                      "extra_options": {"algo_config": "rtn_last"}}}}
    assert export_settings(manifest) == ("int4", "cpu", {"algo_config": "rtn_last"})
    assert export_settings({"precision": "fp32", "execution_provider": "cpu"}) == ("fp32", "cpu", {})


def test_rounds_chain_their_bases_and_name_what_was_published_when_a_later_round_stops(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """run_rounds alone (job.run replaced: the whole job is tests/rlhf/test_job.py's): each round
    starts from the previous child, labels first, and a round without feedback stops the series
    with a message naming the versions already published."""
    calls: list[tuple] = []

    def fake_run(config: object, registry: Registry, base: str, dataset_root: Path | None, fresh: bool,
                 now_ms: int | None, deployment: str, origin: str | None = None) -> dict:
        calls.append(("run", base, now_ms, origin))
        if len(calls) == 4:  # round 2 finds no new feedback
            raise job.JobError("only 0 training comparisons")
        return {"version": f"{base}-child"}

    monkeypatch.setattr(job, "run", fake_run)
    def label(k: int, version: str) -> None:
        calls.append(("label", k, version))

    clock = iter([100, 200])
    with pytest.raises(job.JobError, match=r"round 2 of 3: only 0 training comparisons \(rounds 1-1 published "
                                           r"base-child\)"):
        job.run_rounds(load_config(), Registry(tmp_path / "registry"), 3, base="base", label=label,
                       clock=lambda: next(clock))
    assert calls == [("label", 1, "base"), ("run", "base", 100, "base"),
                     ("label", 2, "base-child"), ("run", "base-child", 200, "base")]
    with pytest.raises(job.JobError, match="rounds must be >= 1"):
        job.run_rounds(load_config(), Registry(tmp_path / "registry"), 0, base="base")


def test_rounds_serve_each_base_before_its_labels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a ``serve`` hook (``--serve-rounds``) round k's base is served before round k is
    labelled, so round 2's labels are drawn from round 1's child, not from the first base."""
    calls: list[tuple] = []
    monkeypatch.setattr(job, "run", lambda config, registry, base, *a, **kw: {"version": f"{base}-child"})
    job.run_rounds(load_config(), Registry(tmp_path / "registry"), 2, base="base",
                   label=lambda k, v: calls.append(("label", k, v)), serve=lambda k, v: calls.append(("serve", k, v)))
    assert calls == [("serve", 1, "base"), ("label", 1, "base"), ("serve", 2, "base-child"),
                     ("label", 2, "base-child")]


def test_a_series_goes_on_from_a_child_numbered_on_and_judged_against_its_origin(
        registry: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--origin``: a later run takes round 2 of the series that made ``child`` from ``base``."""
    calls: list[tuple] = []

    def fake_run(config: object, reg: Registry, base: str, *a: object, origin: str | None = None,
                 **kw: object) -> dict:
        calls.append(("run", base, origin))
        return {"version": f"{base}-next"}

    monkeypatch.setattr(job, "run", fake_run)
    reports = job.run_rounds(load_config(), registry, 1, base="child", origin="base",
                             label=lambda k, v: calls.append(("label", k, v)))
    assert calls == [("label", 2, "child"), ("run", "child", "base")]
    assert [r["round"] for r in reports] == [2]
    assert job.rounds_between(registry, "child", "base") == 1
    assert job.rounds_between(registry, "base", "base") == 0
    with pytest.raises(job.JobError, match="child is not an ancestor of base"):
        job.run_rounds(load_config(), registry, 1, base="base", origin="child")


@pytest.mark.kafka
def test_announced_server_serves_a_gated_child_and_refuses_a_failed_one(
        registry: Registry, tmp_path: Path, kafka_bootstrap: str, unique: str) -> None:
    from colloquy.v1 import events_pb2

    from services.common import events, topics
    from tests.common.kafka_util import Tail

    dep = f"test-{unique}"  # a deployment no running service serves
    src = tmp_path / "src"
    gate = {"passed": True, "score_pct": 79.0, "reference": "child fp32", "reference_pct": 79.5, "points": 2.0}
    registry.publish(src, "good-child", source="rlhf", precision="int4", execution_provider="cpu",
                     parent_version="base", quality={"gate": gate})
    registry.publish(src, "forgetful-child", source="rlhf", precision="int4", execution_provider="cpu",
                     parent_version="base", quality={"gate": {**gate, "passed": False, "parent_pct": 85.0,
                                                              "passed_vs_parent": False}})
    registry.set_current(dep, "base")
    serve = job.announced_server(registry, dep)
    serve(1, "base")  # already served: nothing moves, nothing is announced
    topics.ensure_topics(kafka_bootstrap, [topics.MODEL_UPDATES])
    tail = Tail(kafka_bootstrap, topics.MODEL_UPDATES.name)
    try:
        serve(2, "good-child")
        assert registry.current(dep) == "good-child"
        with pytest.raises(job.JobError, match=r"round 3 is to be labelled on forgetful-child, which cannot be "
                                               r"served: .*quality gate"):
            serve(3, "forgetful-child")
        assert registry.current(dep) == "good-child"
        deadline, mine = time.monotonic() + 30, []
        while not mine and time.monotonic() < deadline:
            mine = [events.decode(r.value, r.headers, events_pb2.ModelUpdate) for r in tail.read(settle=0.2)
                    if r.key == dep.encode()]
    finally:
        tail.close()
    assert [(u.action, u.version, u.parent_version) for u in mine] == [("promote", "good-child", "base")]
