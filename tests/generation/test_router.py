"""The affinity router's choice (services/generation/router.py) without Ray Serve running."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import types
from typing import Any

import pytest

from services.generation import router

KEYS = [f"conversation-{i}" for i in range(2000)]


def owner(key: str, replicas: list[str]) -> str:
    return router.ranks(key, replicas)[0][0]


def test_owner_first_then_every_other_replica_in_weight_order() -> None:
    replicas = ["a", "b", "c"]
    first, rest = router.ranks("conv", replicas)
    assert len(first) == 1 and sorted(first + rest) == replicas
    weights = [router.score("conv", r) for r in first + rest]
    assert weights == sorted(weights, reverse=True)
    assert router.ranks("conv", ["a"]) == [["a"]]
    assert router.ranks("conv", []) == []
    assert router.ranks("conv", ["a", "a", "b"]) in ([["a"], ["b"]], [["b"], ["a"]])


def test_the_choice_depends_on_the_replica_set_not_its_order() -> None:
    for key in KEYS[:200]:
        assert router.ranks(key, ["a", "b", "c"]) == router.ranks(key, ["c", "a", "b"])


def test_two_replicas_share_conversations_about_evenly() -> None:
    counts = collections.Counter(owner(k, ["r1", "r2"]) for k in KEYS)
    assert 0.45 < counts["r1"] / len(KEYS) < 0.55, counts


def test_adding_a_replica_moves_only_the_conversations_it_wins() -> None:
    before = {k: owner(k, ["a", "b", "c"]) for k in KEYS}
    after = {k: owner(k, ["a", "b", "c", "d"]) for k in KEYS}
    moved = [k for k in KEYS if before[k] != after[k]]
    assert all(after[k] == "d" for k in moved)  # nobody moves between the old replicas
    assert 0.2 < len(moved) / len(KEYS) < 0.3  # about 1/4


def test_removing_a_replica_moves_only_its_own_conversations_to_their_second_choice() -> None:
    replicas = ["a", "b", "c"]
    for key in KEYS:
        first, rest = router.ranks(key, replicas)
        survivors = [r for r in replicas if r != "b"]
        if first[0] == "b":
            assert owner(key, survivors) == rest[0]  # the replica that was second takes it over
        else:
            assert owner(key, survivors) == first[0]


def test_routing_key_prefers_the_session_then_the_request_fields() -> None:
    req = types.SimpleNamespace(conversation_id="conv", request_id="req")
    assert router.routing_key("session", [req], "internal") == "session"
    assert router.routing_key("", [req], "internal") == "conv"
    assert router.routing_key("", [types.SimpleNamespace(conversation_id="", request_id="req")], "x") == "req"
    assert router.routing_key("", [object()], "internal") == "internal"
    assert router.routing_key("", [], "internal") == "internal"


def replica(unique_id: str) -> Any:
    return types.SimpleNamespace(replica_id=types.SimpleNamespace(unique_id=unique_id))


def pending(session_id: str) -> Any:
    from ray.serve.request_router import PendingRequest

    field = {f.name: f for f in dataclasses.fields(PendingRequest)}["routing_context"]
    return types.SimpleNamespace(args=[], routing_context=field.default_factory(),  # type: ignore[misc]
                                 metadata=types.SimpleNamespace(session_id=session_id, internal_request_id="i"))


def test_the_serve_adapter_returns_the_ranks_as_replicas_and_backs_off() -> None:
    replicas = [replica("r1"), replica("r2"), replica("r3")]
    adapter = router.ConversationAffinityRouter.__new__(router.ConversationAffinityRouter)
    req = pending("conv-7")
    got = asyncio.run(adapter.choose_replicas(replicas, req))
    assert [[r.replica_id.unique_id for r in rank] for rank in got] == router.ranks("conv-7", ["r1", "r2", "r3"])
    assert req.routing_context.should_backoff is True
    assert asyncio.run(adapter.choose_replicas([], req)) == []


def test_the_router_takes_no_kwargs() -> None:
    adapter = router.ConversationAffinityRouter.__new__(router.ConversationAffinityRouter)
    adapter.initialize_state()
    with pytest.raises(ValueError, match="takes no request_router_kwargs"):
        adapter.initialize_state(num_virtual_nodes=100)
