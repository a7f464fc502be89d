"""Rollout rules (services/generation/rollout.py), the model.updates handler, the registry canary."""

from __future__ import annotations

from pathlib import Path

import pytest
from colloquy.v1 import events_pb2

from services.common import events
from services.common.kafka_loop import Consumed
from services.generation import rollout, updates

A, B = rollout.RolloutState("a"), rollout.RolloutState("b")


@pytest.mark.parametrize(("state", "action", "version", "pct", "want"), [
    (A, "promote", "b", 10, rollout.RolloutState("a", "b", 10)),   # start a canary
    (rollout.RolloutState("a", "b", 10), "promote", "b", 50, rollout.RolloutState("a", "b", 50)),  # widen
    (rollout.RolloutState("a", "b", 50), "promote", "b", 100, B),  # finish it
    (A, "promote", "b", 0, B),                                       # 0 (proto default) = all
    (A, "promote", "a", 30, A),                                      # the stable version: no canary
    (rollout.RolloutState("a", "b", 50), "rollback", "a", 0, A),   # drop the canary
    (B, "rollback", "a", 0, A),                                      # back to the parent
])
def test_apply(state, action, version, pct, want) -> None:
    assert rollout.apply(state, action, version, pct) == want


@pytest.mark.parametrize(("action", "version", "pct", "why"), [
    ("deploy", "b", 100, "action"), ("promote", "", 100, "no version"), ("promote", "b", 101, "outside"),
])
def test_apply_refuses(action, version, pct, why) -> None:
    with pytest.raises(rollout.InvalidUpdate, match=why):
        rollout.apply(A, action, version, pct)


def test_canary_share_is_by_conversation_and_close_to_the_percent() -> None:
    state = rollout.RolloutState("a", "b", 30)
    picks = [rollout.in_canary(state, f"conv-{i}") for i in range(4000)]
    assert 0.27 < sum(picks) / len(picks) < 0.33
    assert rollout.in_canary(state, "conv-7") == rollout.in_canary(state, "conv-7")  # stable
    assert rollout.bucket("conv-7") == rollout.bucket("conv-7") and 0 <= rollout.bucket("x") < 100
    assert not rollout.in_canary(A, "conv-7")


def _consumed(**kw) -> Consumed[events_pb2.ModelUpdate]:
    return Consumed(message=events_pb2.ModelUpdate(deployment="generation", **kw), key="generation", event_id="e",
                    request_id="", traceparent="", topic="model.updates", partition=0, offset=0)


def test_handler_applies_changes_once_and_dead_letters_bad_updates() -> None:
    applied: list[rollout.RolloutState] = []
    handle = updates.make_handler(applied.append, A, lambda v: v in {"a", "b"})
    handle(_consumed(version="b", action="promote", canary_percent=20))
    handle(_consumed(version="b", action="promote", canary_percent=20))  # redelivered: no second apply
    handle(_consumed(version="b", action="promote", canary_percent=100))
    assert applied == [rollout.RolloutState("a", "b", 20), B]
    with pytest.raises(events.PoisonEvent, match="not in the registry"):
        handle(_consumed(version="zzz", action="promote"))
    with pytest.raises(events.PoisonEvent, match="action"):
        handle(_consumed(version="a", action="explode"))
    assert list(handle(_consumed(version="a", action="rollback"))) == []
    assert applied[-1] == A
    other = events_pb2.ModelUpdate(deployment="reward", version="zzz", action="promote")
    assert list(handle(Consumed(message=other, key="", event_id="", request_id="", traceparent="",
                                topic="t", partition=0, offset=1))) == []


def test_registry_canary_and_cli_state(tmp_path: Path) -> None:
    from model.registry import PointerError, Registry

    src = tmp_path / "src"
    src.mkdir()
    (src / "genai_config.json").write_text("{}")
    reg = Registry(tmp_path / "reg")
    for v in ("a", "b"):
        reg.publish(src, v, source="test", precision="fp32", execution_provider="cpu")
    reg.set_current("generation", "a")
    assert updates.registry_state(reg) == A
    reg.set_canary("generation", "b", 25)
    assert updates.registry_state(reg) == rollout.RolloutState("a", "b", 25)
    assert reg.deployments() == ["generation"]  # the canary file is not a deployment
    with pytest.raises(PointerError):
        reg.set_canary("generation", "b", 100)
    reg.clear_canary("generation")
    assert updates.registry_state(reg) == A
