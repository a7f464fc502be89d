"""Turn index assignment and the one-turn-at-a-time rule, in memory (no I/O).

The history topic only learns of a turn when it finishes, so between "prompt assembled" and
"answer recorded" this tracker is what knows a turn is in flight. It is safe to lose on a
restart: the prompt stage's transaction rolls back whatever it had not committed. A turn that
generation gives up on (refused, dead-lettered) is never recorded either: generation says so on
chat.unanswered and `forget_unanswered` frees it at once; one lost some other way (a crash
downstream) stops counting after its expiry.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Mapping

from colloquy.v1 import chat_pb2


class ConversationNotFound(LookupError):
    """The conversation belongs to someone else (its existence is not revealed)."""


class TurnInProgress(RuntimeError):
    """The conversation already has a turn being answered."""


@dataclasses.dataclass(frozen=True)
class Pending:
    request_id: str
    conversation_id: str
    user_id: str
    index: int
    blocked: bool
    expires_ms: int


@dataclasses.dataclass(frozen=True)
class Assignment:
    """The index a request gets; `redelivered` when this request already had one."""

    index: int
    redelivered: bool = False
    already_recorded: bool = False


class TurnTracker:
    """Assigns turn indexes so a redelivered request keeps its index and turns never overlap."""

    def __init__(self, ttl_ms: int, deadline_grace_ms: int = 5000) -> None:
        self.ttl_ms = ttl_ms
        self.deadline_grace_ms = deadline_grace_ms
        self._by_request: dict[str, Pending] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_request)

    def expiry(self, now_ms: int, deadline_ms: int) -> int:
        """When a pending turn stops counting: its deadline (+ grace), capped by the TTL."""
        cap = now_ms + self.ttl_ms
        return min(deadline_ms + self.deadline_grace_ms, cap) if deadline_ms else cap

    def _prune(self, conversation_id: str, recorded: Mapping[int, chat_pb2.Turn], now_ms: int) -> None:
        for rid, p in list(self._by_request.items()):
            if p.expires_ms < now_ms or (p.conversation_id == conversation_id and p.index in recorded):
                del self._by_request[rid]

    def _next_index(self, conversation_id: str, owner: str | None, user_id: str,
                    recorded: Mapping[int, chat_pb2.Turn]) -> tuple[int, list[Pending]]:
        mine = [p for p in self._by_request.values() if p.conversation_id == conversation_id]
        if owner is None and mine:
            owner = mine[0].user_id  # a new conversation whose first turn is still in flight
        if owner is not None and owner != user_id:
            raise ConversationNotFound(conversation_id)
        last = max([*recorded, *(p.index for p in mine)], default=0)
        return last + 1, mine

    def assign(self, *, request_id: str, conversation_id: str, user_id: str, owner: str | None,
               recorded: Mapping[int, chat_pb2.Turn], now_ms: int, expires_ms: int,
               blocked: bool = False) -> Assignment:
        """Claim the next index for a request.

        `owner` is the conversation's owner in the history (None if it has no recorded turn) and
        `recorded` its recorded turns. Raises ConversationNotFound or TurnInProgress.
        """
        with self._lock:
            self._prune(conversation_id, recorded, now_ms)
            for index, turn in recorded.items():
                if turn.request_id and turn.request_id == request_id:
                    return Assignment(index, redelivered=True, already_recorded=True)
            known = self._by_request.get(request_id)
            if known is not None and known.conversation_id == conversation_id:
                return Assignment(known.index, redelivered=True)
            index, mine = self._next_index(conversation_id, owner, user_id, recorded)
            if any(not p.blocked for p in mine):
                raise TurnInProgress(conversation_id)
            self._by_request[request_id] = Pending(request_id, conversation_id, user_id, index,
                                                   blocked, expires_ms)
            return Assignment(index)

    def peek(self, *, conversation_id: str, user_id: str, owner: str | None,
             recorded: Mapping[int, chat_pb2.Turn], now_ms: int) -> int:
        """The index the next turn would get, claiming nothing (direct AssemblePrompt calls)."""
        with self._lock:
            self._prune(conversation_id, recorded, now_ms)
            return self._next_index(conversation_id, owner, user_id, recorded)[0]

    def forget_unanswered(self, request_id: str, conversation_id: str) -> bool:
        """Free a turn generation gave up on: it will never be recorded, so the conversation's
        next turn may go on (and takes its index). False when this process holds no such turn."""
        with self._lock:
            p = self._by_request.get(request_id)
            if p is None or p.conversation_id != conversation_id:
                return False
            del self._by_request[request_id]
            return True

    def release(self, request_id: str) -> None:
        """Forget a claim whose turn was refused before anything was produced for it."""
        with self._lock:
            self._by_request.pop(request_id, None)
