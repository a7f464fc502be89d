"""Conversation affinity for the generation deployment: a Ray Serve request router.

A replica keeps the KV of the prompts it prefilled and of the answers it finished (cache fills) in
its engine's prefix cache (prefix_cache.py, scheduler.py), so a conversation's next turn is cheap
only on the replica that ran its earlier turns. Serve's
default router (power of two random choices) sends it to either replica of two at random.

`ranks` is the choice, a pure function: rendezvous (highest-random-weight) hashing of the
conversation over the live replica ids. Every router (each Kafka worker's handle, the gRPC proxy)
computes the same owner from the same replica set, with no shared state; adding or removing one
replica of N moves only about 1/N of the conversations (those it wins or held). The owner is the
first rank; the other replicas form the second, from which Serve takes the least loaded one: a
conversation leaves its owner only while the owner is at `max_ongoing_requests` (or gone), and then
prefills in full elsewhere. `ConversationAffinityRouter` is the thin Serve adapter.

The routing key is the call's `session_id` (the Kafka worker sets it to the conversation id; gRPC
clients send metadata `session_id`), else the request's `conversation_id` or `request_id` when the
first argument carries them (engine.Request), else Serve's per-call id (no affinity).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from services.common import private_api

__all__ = ["ConversationAffinityRouter", "ranks", "routing_key", "score"]


def score(key: str, replica_id: str) -> int:
    """The replica's weight for `key`: the same in every process (no per-process hash seed)."""
    digest = hashlib.blake2b(f"{key}\x00{replica_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def ranks(key: str, replica_ids: Sequence[str]) -> list[list[str]]:
    """[[owner], [the others]]: the owner is the replica of highest weight for `key`; the others
    follow in weight order, as a list for Serve to pick the least loaded from."""
    ordered = sorted(dict.fromkeys(replica_ids), key=lambda rid: (score(key, rid), rid), reverse=True)
    if not ordered:
        return []
    return [ordered[:1], ordered[1:]] if len(ordered) > 1 else [ordered]


def routing_key(session_id: str, args: Sequence[Any], internal_request_id: str) -> str:
    """The conversation a call belongs to (see the module docstring for the order)."""
    if session_id:
        return session_id
    first = args[0] if args else None
    for field in ("conversation_id", "request_id"):
        value = getattr(first, field, "")
        if isinstance(value, str) and value:
            return value
    return internal_request_id


class ConversationAffinityRouter(RequestRouter):
    """Serve adapter of `ranks` (serve_config.yaml `request_router_config`).

    No FIFO mixin on purpose: with it, Serve hands a replica chosen for one request to the oldest
    pending request, which is another conversation's. The base class assigns it to this request.
    """

    def initialize_state(self, **kwargs: Any) -> None:
        if kwargs:
            raise ValueError(f"ConversationAffinityRouter takes no request_router_kwargs (got {sorted(kwargs)})")

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        if pending_request is None:
            return [candidate_replicas]
        # When every rank is full, Serve retries; without this it retries at once, in a busy loop.
        private_api.back_off_between_routing_rounds(pending_request)
        meta = pending_request.metadata
        key = routing_key(meta.session_id, pending_request.args, meta.internal_request_id)
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        return [[by_id[rid] for rid in rank] for rank in ranks(key, list(by_id))]
