"""Helpers every pipeline stage uses on a TurnEvent: replies to the gateway, deadlines, history keys."""

from __future__ import annotations

import time

from colloquy.v1 import chat_pb2, events_pb2

from services.common import events, topics


def now_ms() -> int:
    return int(time.time() * 1000)


def deadline_passed(turn: events_pb2.TurnEvent) -> bool:
    """Stages drop work whose client deadline has passed (0 = no deadline)."""
    return bool(turn.deadline_unix_ms) and now_ms() > turn.deadline_unix_ms


def reply(turn: events_pb2.TurnEvent, traceparent: str = "", **oneof: object) -> events.OutEvent:
    """A ReplyEvent for the gateway replica holding this turn's stream.

    Pass exactly one of started=, text=, moderation=, done=, error=, retraction=.
    """
    msg = events_pb2.ReplyEvent(request_id=turn.request_id, conversation_id=turn.conversation_id, **oneof)
    return events.OutEvent(topic=turn.reply_topic, key=turn.conversation_id, message=msg,
                           request_id=turn.request_id, traceparent=traceparent)


def reply_error(turn: events_pb2.TurnEvent, code: str, message: str, stage: str,
                traceparent: str = "") -> events.OutEvent:
    """Fail the turn at the gateway with a gRPC status code name and a clear message."""
    return reply(turn, traceparent, error=events_pb2.StageError(code=code, message=message, stage=stage))


def deadline_error(turn: events_pb2.TurnEvent, stage: str, traceparent: str = "") -> events.OutEvent:
    return reply_error(turn, "DEADLINE_EXCEEDED",
                       f"the request's deadline passed before the {stage} stage could handle it", stage,
                       traceparent)


def unanswered(request_id: str, conversation_id: str, code: str, stage: str, traceparent: str = "",
               event_id: str = "") -> events.OutEvent:
    """The TurnUnanswered event that frees a conversation after a stage gave up on its turn (no
    TurnRecord will ever come): the prompt stage forgets the pending turn, so the client's retry
    is not refused ABORTED until the pending turn expires."""
    msg = events_pb2.TurnUnanswered(request_id=request_id, conversation_id=conversation_id, code=code,
                                    stage=stage)
    return events.OutEvent(topic=topics.CHAT_UNANSWERED.name, key=conversation_id, message=msg,
                           request_id=request_id, traceparent=traceparent, event_id=event_id)


def history_key(conversation_id: str, turn_index: int) -> str:
    """Key of a TurnRecord on the compacted history topic: one record per turn, ever."""
    return f"{conversation_id}/{turn_index}"


def turn_record_event(record: events_pb2.TurnRecord, request_id: str = "",
                      traceparent: str = "") -> events.OutEvent:
    """Write a finished turn to the history, on its conversation's partition."""
    t = topics.CONVERSATION_TURNS
    return events.OutEvent(
        topic=t.name, key=history_key(record.conversation_id, record.turn.index), message=record,
        request_id=request_id, traceparent=traceparent,
        partition=topics.partition_for(record.conversation_id, t.partitions))


def started(turn: events_pb2.TurnEvent) -> chat_pb2.ChatStarted:
    return chat_pb2.ChatStarted(conversation_id=turn.conversation_id, turn_index=turn.turn_index,
                                request_id=turn.request_id)
