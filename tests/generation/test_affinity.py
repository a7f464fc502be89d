"""Conversation affinity on 2 real Serve replicas of the tiny model (services/generation/router.py).

Multi-turn conversations are played through a DeploymentHandle as the Kafka worker calls it
(session_id = conversation id), one turn at a time, so each turn's cached prompt tokens are exact
(the rise of the replicas' prefix-cache hit counters; the harness is bench/affinity.py's).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.affinity import BLOCK, Conversation, Serve2, new_conversations, play_round, prefilled, reusable
from devtools.procs import free_port
from services.generation import router
from tests.generation.conftest import serve_running

pytestmark = pytest.mark.ray

# Each replica reserves half of the local Ray's 2 CPUs' worth (they share this machine's cores).
# max_ongoing_requests 2: a third concurrent call of one conversation finds its owner full.
OVERRIDES: dict[str, Any] = {"autoscaling_config": None, "num_replicas": 2, "ray_actor_options": {"num_cpus": 0.5},
                             "graceful_shutdown_timeout_s": 5, "max_ongoing_requests": 2}
TOKENS = 8


@pytest.fixture(scope="module")
def serve2(tiny_model_dir: Path) -> Iterator[Serve2]:
    from ray import serve

    env = {"GENERATION_MODEL_DIR": str(tiny_model_dir), "GENERATION_MODEL_VERSION": "tiny-affinity",
           "GENERATION_REPLICA_METRICS_PORT": str(free_port()), "GENERATION_STREAM_INTERVAL_MS": "50",
           "GENERATION_MAX_RUNNING": "4"}
    with serve_running(env, OVERRIDES):
        s = Serve2(serve.get_deployment_handle("generation", "generation"))
        s.discover(2)
        yield s


def owned(replicas: list[str], per_replica: int) -> list[Conversation]:
    """Conversations the router gives `per_replica` to each replica (so both hold some)."""
    picked: dict[str, list[Conversation]] = {r: [] for r in replicas}
    for conv in (new_conversations(1)[0] for _ in itertools.count()):
        mine = picked[router.ranks(conv.id, replicas)[0][0]]
        if len(mine) < per_replica:
            mine.append(conv)
        if all(len(v) == per_replica for v in picked.values()):
            return [c for v in picked.values() for c in v]
    raise AssertionError("unreachable")


def test_a_full_owner_sends_the_overflow_to_the_other_replica(serve2: Serve2) -> None:
    replicas = sorted(serve2.replicas)
    conv = owned(replicas, 1)[0]
    owner = router.ranks(conv.id, replicas)[0][0]
    prompt = conv.prompt("Tell me a long story.")

    async def three() -> list[Any]:
        return await asyncio.gather(*(serve2.call(conv.id, prompt, 200) for _ in range(3)))

    answers = asyncio.run(three())
    where = collections.Counter(status["replica"] for status, *_ in answers)
    assert where[owner] == 2 and sum(where.values()) == 3, where  # the owner's 2 slots, then the other
    assert all(status["code"] == "OK" and finish for status, _, finish, _ in answers)


def test_turns_stay_on_their_replica_and_move_with_a_full_prefill_when_it_dies(serve2: Serve2) -> None:
    import ray

    replicas = sorted(serve2.replicas)
    convs = owned(replicas, 2)
    for _ in range(3):
        play_round(serve2, convs, TOKENS)
    for conv in convs:
        owner = router.ranks(conv.id, replicas)[0][0]
        assert [t.replica for t in conv.turns] == [owner] * 3, conv.id
        for prev, turn in itertools.pairwise(conv.turns):
            # At least the whole previous prompt (whole blocks) came from the cache, but for one block
            # where the tokenizer split the seam differently; at most it and its answer (if the engine
            # filled the answer into its cache).
            assert prefilled(prev) - BLOCK <= turn.cached <= reusable(prev, turn), (conv.id, turn)
    shared = max(t.cached for c in convs for t in c.turns[:1])  # what the conversations' starts share

    victim = serve2.replicas[replicas[0]]
    ray.kill(ray.get_actor(victim.actor_name, namespace="serve"), no_restart=True)
    moved = [c for c in convs if c.turns[-1].replica == victim.id]
    after = play_round(serve2, moved, TOKENS)  # at once: Serve has not replaced the replica yet
    for conv, turn in zip(moved, after, strict=True):
        assert turn.replica == replicas[1] and turn.finish, turn  # answered by the other replica
        assert turn.cached <= shared < prefilled(conv.turns[-2]), turn
        assert [t.index for t in conv.turns] == [1, 2, 3, 4]
    # The other replica now holds them: their next turn hits there. (Serve replaces the killed
    # replica only after its health check fails, seconds later; a replacement that had already
    # come up would win about half of them, and prefill them in full once.)
    for conv, turn in zip(moved, play_round(serve2, moved, TOKENS), strict=True):
        assert turn.replica not in (victim.id, ""), turn
        if turn.replica == replicas[1]:
            assert turn.cached >= prefilled(conv.turns[-2]) - BLOCK, turn
        else:
            assert turn.cached <= shared, turn
