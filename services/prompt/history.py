"""Reading a conversation for a new turn: read-your-writes wait, then owner and recorded turns."""

from __future__ import annotations

import logging

from colloquy.v1 import chat_pb2

from services.common import topics
from services.conversation.reader import StoreReader
from services.prompt.pending import ConversationNotFound

log = logging.getLogger(__name__)


class HistoryUnavailable(RuntimeError):
    """The history could not be brought up to date in time (broker or database down, the
    materializer behind)."""


def lookup(reader: StoreReader, conversation_id: str, user_id: str,
           wait_s: float) -> tuple[str | None, dict[int, chat_pb2.Turn]]:
    """(owner, recorded turns) of a conversation, once the store holds every turn of it
    committed to the topic before this call.

    Blocking. The owner is None when nothing is recorded yet; someone else's conversation, or a
    deleted one, raises ConversationNotFound, so the caller answers NOT_FOUND without learning
    which (a turn for a deleted conversation would never be recorded).
    """
    partition = topics.partition_for(conversation_id, topics.CONVERSATION_TURNS.partitions)
    try:
        caught_up = reader.wait_caught_up([partition], wait_s)
        history = reader.db.history(conversation_id) if caught_up else None
    except Exception as exc:
        log.warning("history lookup failed", extra={"error": repr(exc)[:500]})
        raise HistoryUnavailable("the conversation history is not reachable") from exc
    if not caught_up:
        raise HistoryUnavailable("the conversation history is behind the conversation's latest turns")
    if history is None:
        return None, {}
    if history.deleted or history.user_id != user_id:
        raise ConversationNotFound(conversation_id)
    return user_id, {t.index: t for t in history.turns}
