"""client_request_id: one turn per key, whichever gateway a retry reaches (no I/O here).

The turn's request id is derived from (user, conversation, key), so a retry names the same turn
everywhere: the prompt stage gives a known request id its turn index again and skips one already
recorded, the history records the request id with the turn, and a gateway holding the stream can
attach the retry to it. A chat that starts a conversation derives the conversation id from
(user, key) the same way, so its retry lands in the same conversation.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterable

from colloquy.v1 import chat_pb2, common_pb2

_NAMESPACE = uuid.UUID("5b0c1d3e-8f7a-4c64-9a51-6f2d7c0e9b17")

MODERATED_NOTICE = "the rest of this answer was withheld by moderation"


def conversation_id(user: str, client_request_id: str) -> str:
    """The new conversation a keyed chat without a conversation id starts."""
    return str(uuid.uuid5(_NAMESPACE, f"{user}\x00{client_request_id}"))


def request_id(user: str, conversation: str, client_request_id: str) -> str:
    """The turn's request id (32 hex characters, like a random one)."""
    digest = hashlib.sha256(f"{user}\x00{conversation}\x00{client_request_id}".encode())
    return digest.hexdigest()[:32]


def recorded(turns: Iterable[chat_pb2.Turn], rid: str) -> chat_pb2.Turn | None:
    """The recorded turn made by request `rid`, if any."""
    return next((t for t in turns if t.request_id == rid), None)


def replay(turn: chat_pb2.Turn, conversation: str, sent: dict[int, int],
           started: bool) -> list[chat_pb2.ChatEvent]:
    """A recorded turn as the rest of a stream: `started` unless already sent, the text beyond what
    `sent` says each candidate has had (or a retraction down to the recorded text, when the stream
    showed more: stream-first moderation cut it), the moderation notices, then `done` (its usage is not
    recorded, so it is zero)."""
    out: list[chat_pb2.ChatEvent] = []
    if not started:
        out.append(chat_pb2.ChatEvent(started=chat_pb2.ChatStarted(
            conversation_id=conversation, turn_index=turn.index, request_id=turn.request_id)))
    answers = sorted(turn.answers, key=lambda a: a.index)
    if turn.blocked:  # refused by input moderation: the refusal is the notice, there is no answer
        refusal = answers[0].text if answers else ""
        out.append(chat_pb2.ChatEvent(moderation=chat_pb2.ModerationNotice(stage="input", message=refusal)))
    else:
        for a in answers:
            already = sent.get(a.index, 0)
            if len(a.text) > already:
                out.append(chat_pb2.ChatEvent(delta=chat_pb2.ChatDelta(index=a.index, text=a.text[already:])))
            elif already > len(a.text):  # stream-first moderation cut text this stream had shown
                out.append(chat_pb2.ChatEvent(retraction=chat_pb2.ChatRetraction(index=a.index,
                                                                                  kept_chars=len(a.text))))
        for a in answers:
            if a.finish_reason == "moderated":
                out.append(chat_pb2.ChatEvent(moderation=chat_pb2.ModerationNotice(
                    stage="output", message=MODERATED_NOTICE, index=a.index)))
    out.append(chat_pb2.ChatEvent(done=chat_pb2.ChatDone(
        finish_reasons=[chat_pb2.FinishReasonEntry(index=a.index, reason=a.finish_reason) for a in answers],
        usage=common_pb2.Usage(), model_version=turn.model_version, template_version=turn.template_version)))
    return out
