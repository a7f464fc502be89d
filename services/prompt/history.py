"""Reading a conversation for a new turn: read-your-writes wait, then owner and recorded turns."""

from __future__ import annotations

import logging

from colloquy.v1 import chat_pb2

from services.common import topics
from services.conversation.reader import HistoryReader
from services.prompt.pending import ConversationNotFound

log = logging.getLogger(__name__)


class HistoryUnavailable(RuntimeError):
    """The history could not be brought up to date in time (broker down, replay still running)."""


def lookup(reader: HistoryReader, conversation_id: str, user_id: str,
           wait_s: float) -> tuple[str | None, dict[int, chat_pb2.Turn]]:
    """(owner, recorded turns) of a conversation, after every committed turn of it is applied.

    Blocking. The owner is None when nothing is recorded yet; someone else's conversation raises
    ConversationNotFound, so the caller answers NOT_FOUND without learning whose it is.
    """
    partition = topics.partition_for(conversation_id, topics.CONVERSATION_TURNS.partitions)
    try:
        caught_up = reader.wait_caught_up(timeout=wait_s, partitions=[partition])
    except Exception as exc:
        log.warning("history probe failed", extra={"error": repr(exc)})
        raise HistoryUnavailable("the conversation history is not reachable") from exc
    if not caught_up:
        raise HistoryUnavailable("the conversation history is still loading")
    view = reader.store.get(conversation_id, user_id)
    if view is not None:
        return user_id, dict(view.turns)
    if reader.store.exists(conversation_id):
        raise ConversationNotFound(conversation_id)
    return None, {}
