"""The tokenizer stage's handler as a function (no broker): what it emits for one record."""

from __future__ import annotations

import pytest
from colloquy.v1 import events_pb2

from services.common import events, kafka_loop, turns
from services.tokenizer.domain import TextTokenizer
from services.tokenizer.worker import make_handler


def consumed(turn: events_pb2.TurnEvent) -> kafka_loop.Consumed[events_pb2.TurnEvent]:
    return kafka_loop.Consumed(message=turn, key=turn.conversation_id, event_id="e1", request_id="",
                               traceparent="00-" + "a" * 32 + "-" + "b" * 16 + "-01", topic="in",
                               partition=0, offset=0)


def test_counts_tokens_and_keeps_key_request_id_and_trace(tok: TextTokenizer) -> None:
    turn = events_pb2.TurnEvent(request_id="r1", conversation_id="c1", message="Hello world", reply_topic="rt")
    [out] = make_handler(tok, "out")(consumed(turn))
    assert (out.topic, out.key, out.request_id) == ("out", "c1", "r1")
    assert out.traceparent.startswith("00-aaaa")
    assert out.message.message_tokens == 2


def test_expired_turn_is_answered_with_deadline_exceeded(tok: TextTokenizer) -> None:
    turn = events_pb2.TurnEvent(request_id="r1", conversation_id="c1", message="hi", reply_topic="rt",
                                deadline_unix_ms=turns.now_ms() - 1)
    [out] = make_handler(tok, "out")(consumed(turn))
    assert out.topic == "rt" and out.message.error.code == "DEADLINE_EXCEEDED"


def test_turn_nobody_can_be_told_about_is_poison(tok: TextTokenizer) -> None:
    with pytest.raises(events.PoisonEvent):
        list(make_handler(tok, "out")(consumed(events_pb2.TurnEvent(request_id="r1", conversation_id="c1"))))
