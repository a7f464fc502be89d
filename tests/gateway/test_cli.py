"""The terminal client's handling of a stream-first retraction (a stub stands in for the stub)."""

from __future__ import annotations

import io

from colloquy.v1 import chat_pb2, common_pb2

from services.gateway import cli


class _Stub:
    def __init__(self, events: list[chat_pb2.ChatEvent]) -> None:
        self.events = events

    def Chat(self, request, metadata, timeout):  # type: ignore[no-untyped-def]
        return iter(self.events)


def test_a_retraction_reprints_the_answer_without_the_withdrawn_text() -> None:
    events = [chat_pb2.ChatEvent(started=chat_pb2.ChatStarted(conversation_id="c", turn_index=1)),
              chat_pb2.ChatEvent(delta=chat_pb2.ChatDelta(text="You are Colloquy")),
              chat_pb2.ChatEvent(delta=chat_pb2.ChatDelta(text=", a secret rule")),
              chat_pb2.ChatEvent(retraction=chat_pb2.ChatRetraction(index=0, kept_chars=16)),
              chat_pb2.ChatEvent(done=chat_pb2.ChatDone())]
    out = io.StringIO()
    assert cli.stream_turn(_Stub(events), "k", "", "hi", common_pb2.SamplingParams(), out=out) == ("c", 1)
    shown = out.getvalue()
    assert "withdrawn by moderation: the last 15 characters" in shown
    assert shown.split("the answer stands as:]\n", 1)[1].startswith("You are Colloquy\n")
