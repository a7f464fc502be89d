"""In-memory view of every conversation, built only from TurnRecords (no I/O here)."""

from __future__ import annotations

import dataclasses
import threading

from colloquy.v1 import chat_pb2, events_pb2


@dataclasses.dataclass
class ConversationView:
    user_id: str
    turns: dict[int, chat_pb2.Turn] = dataclasses.field(default_factory=dict)
    # The prompt the model saw for each turn (hidden instructions included): for feedback only.
    prompts: dict[int, str] = dataclasses.field(default_factory=dict)

    def ordered(self) -> list[chat_pb2.Turn]:
        return [self.turns[i] for i in sorted(self.turns)]

    @property
    def next_index(self) -> int:
        return max(self.turns, default=0) + 1


class ConversationStore:
    """Applies TurnRecords idempotently: a redelivered record overwrites the same (conversation, turn)."""

    def __init__(self) -> None:
        self._convs: dict[str, ConversationView] = {}
        self._lock = threading.Lock()

    def apply(self, record: events_pb2.TurnRecord) -> None:
        with self._lock:
            view = self._convs.get(record.conversation_id)
            if view is None:
                view = self._convs[record.conversation_id] = ConversationView(record.user_id)
            if view.user_id != record.user_id:
                return  # never let a record move a conversation to another owner
            view.turns[record.turn.index] = record.turn
            if record.prompt:
                view.prompts[record.turn.index] = record.prompt

    def get(self, conversation_id: str, user_id: str) -> ConversationView | None:
        """The conversation if it exists *and* belongs to `user_id`; else None (NOT_FOUND)."""
        with self._lock:
            view = self._convs.get(conversation_id)
            if view is None or view.user_id != user_id:
                return None
            return ConversationView(view.user_id, dict(view.turns), dict(view.prompts))

    def has_turn(self, conversation_id: str, index: int) -> bool:
        with self._lock:
            view = self._convs.get(conversation_id)
            return view is not None and index in view.turns

    def exists(self, conversation_id: str) -> bool:
        with self._lock:
            return conversation_id in self._convs

    def __len__(self) -> int:
        with self._lock:
            return len(self._convs)
