"""The reply channel's backlog for a listener that attaches late (an idempotent retry)."""

from __future__ import annotations

from colloquy.v1 import chat_pb2, events_pb2

from services.gateway.replies import ReplyChannel


def test_a_late_listener_gets_the_longest_text_then_the_retraction_then_the_notice() -> None:
    channel = ReplyChannel()
    started = events_pb2.ReplyEvent(request_id="r", started=chat_pb2.ChatStarted(turn_index=1))
    texts = [events_pb2.ReplyEvent(request_id="r", text=events_pb2.ReleasedText(index=0, text=t))
             for t in ("Sure", "Sure, here is all", "Sure")]  # the last: what stands after the cut
    retraction = events_pb2.ReplyEvent(request_id="r", retraction=chat_pb2.ChatRetraction(index=0, kept_chars=4))
    notice = events_pb2.ReplyEvent(request_id="r", moderation=chat_pb2.ModerationNotice(stage="output"))
    for ev in (started, texts[0], texts[1], retraction, texts[2], notice):
        channel.record(ev)
    kinds = [ev.WhichOneof("reply") for ev in channel.backlog()]
    assert kinds == ["started", "text", "retraction", "moderation"]
    assert channel.backlog()[1].text.text == "Sure, here is all"  # what the client would have seen, then cut
