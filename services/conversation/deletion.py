"""Deleting a conversation everywhere it is kept: the log, the store and the feedback dataset.

One routine for the gateway's DeleteConversation and the conversation service's retention
sweep, in an order where every failure leaves something a retry can finish:
1. `ConversationErased` on `chat.feedback` (keyed by the conversation, so it lands after that
   conversation's feedback): the feedback sink removes its rows from the dataset.
2. A tombstone (null value) for every `<conversation>/<turn>` key on the compacted
   `conversation.turns`, on the conversation's partition: compaction drops the turns from the
   log, and the materializer marks the conversation deleted when its last turn goes.
3. `ConversationDB.delete_conversation`: readers stop seeing it now, not when the
   materializer gets to the tombstones.
A failure in 1 or 2 raises before the store is touched, so the conversation is still there to
delete again (a second erasure or tombstone changes nothing).
"""

from __future__ import annotations

import logging

from colloquy.v1 import events_pb2
from kafka import KafkaProducer

from services.common import events, topics, turns
from services.conversation.db import ConversationDB

log = logging.getLogger(__name__)

SEND_TIMEOUT_S = 10.0


def tombstones(conversation_id: str, indexes: list[int],
               partitions: int = topics.CONVERSATION_TURNS.partitions) -> list[tuple[str, int]]:
    """(key, partition) of each tombstone: the keys and partition the turns were written with
    (turns.turn_record_event), or compaction would keep the turns."""
    partition = topics.partition_for(conversation_id, partitions)
    return [(turns.history_key(conversation_id, i), partition) for i in indexes]


class Eraser:
    """Deletes conversations (blocking; call it from a thread)."""

    def __init__(self, db: ConversationDB, producer: KafkaProducer, *,
                 turns_topic: str = topics.CONVERSATION_TURNS.name,
                 feedback_topic: str = topics.CHAT_FEEDBACK.name) -> None:
        self.db = db
        self.producer = producer
        self.turns_topic = turns_topic
        self.feedback_topic = feedback_topic

    def erase(self, conversation_id: str, user_id: str, reason: str) -> int | None:
        """Delete the user's conversation; the number of turns it had, or None when it is not
        the user's or is already deleted. Raises when Kafka does not acknowledge in time (the
        store is then untouched)."""
        indexes = self.db.turn_indexes(conversation_id, user_id)
        if indexes is None:
            return None
        erased = events_pb2.ConversationErased(conversation_id=conversation_id, user_id=user_id, reason=reason,
                                               erased_unix_ms=turns.now_ms())
        out = events.OutEvent(self.feedback_topic, conversation_id, erased)
        self.producer.send(out.topic, key=out.key.encode(), value=erased.SerializeToString(),
                           headers=out.headers()).get(timeout=SEND_TIMEOUT_S)
        sent = [self.producer.send(self.turns_topic, key=key.encode(), value=None, partition=partition)
                for key, partition in tombstones(conversation_id, indexes)]
        for future in sent:
            future.get(timeout=SEND_TIMEOUT_S)
        self.db.delete_conversation(conversation_id, user_id)
        log.info("conversation deleted", extra={"conversation_id": conversation_id, "turns": len(indexes),
                                                "reason": reason})
        return len(indexes)
