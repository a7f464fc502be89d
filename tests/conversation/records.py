"""Building TurnRecords and store changes for the conversation tests."""

from __future__ import annotations

from colloquy.v1 import chat_pb2, events_pb2

from services.common.turns import history_key
from services.conversation import domain
from services.conversation.db import ConversationDB


def record(conv: str, user: str, index: int, message: str = "", *, created_ms: int = 0,
           answer: str = "an answer", prompt: str = "") -> events_pb2.TurnRecord:
    turn = chat_pb2.Turn(index=index, user_message=message or f"message {index}", request_id=f"req-{conv}-{index}",
                         answers=[chat_pb2.Answer(index=0, text=answer)])
    if created_ms:
        turn.created_at.FromMilliseconds(created_ms)
    return events_pb2.TurnRecord(conversation_id=conv, user_id=user, turn=turn,
                                 prompt=prompt or f"<prompt for {index}>")


def key(rec: events_pb2.TurnRecord) -> bytes:
    return history_key(rec.conversation_id, rec.turn.index).encode()


class Feeder:
    """Applies changes the way the materializer does: one partition, offsets moving with them."""

    def __init__(self, db: ConversationDB, group: str = "g", topic: str = "t", partition: int = 0) -> None:
        self.db, self.group, self.topic, self.partition = db, group, topic, partition
        self.offset = 0
        self.stored: int | None = None

    def put(self, *recs: events_pb2.TurnRecord) -> None:
        changes: list[domain.Change] = []
        for rec in recs:
            changes.append(domain.change_for(key(rec), rec.SerializeToString(), None, self.partition,
                                             self.offset, 1_700_000_000_000 + self.offset))
            self.offset += 1
        self._commit(changes)

    def tombstone(self, conv: str, index: int) -> None:
        change = domain.change_for(history_key(conv, index).encode(), None, None, self.partition, self.offset, 0)
        self.offset += 1
        self._commit([change])

    def _commit(self, changes: list[domain.Change]) -> None:
        self.db.apply(self.group, self.topic, changes, {self.partition: self.stored}, {self.partition: self.offset})
        self.stored = self.offset
