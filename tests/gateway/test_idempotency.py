"""client_request_id: derived ids, replaying a recorded turn, and a late listener's backlog."""

from __future__ import annotations

import asyncio

from colloquy.v1 import chat_pb2, events_pb2

from services.common.config import KafkaConfig
from services.gateway import idempotency
from services.gateway.replies import ReplyRouter


def test_ids_are_stable_per_user_conversation_and_key() -> None:
    conv = idempotency.conversation_id("ann", "k1")
    assert conv == idempotency.conversation_id("ann", "k1")
    assert conv != idempotency.conversation_id("bob", "k1")  # another user's key never collides into ann's
    assert conv != idempotency.conversation_id("ann", "k2")
    rid = idempotency.request_id("ann", conv, "k1")
    assert rid == idempotency.request_id("ann", conv, "k1") and len(rid) == 32
    assert rid != idempotency.request_id("ann", idempotency.conversation_id("ann", "x"), "k1")


def turn(**kw: object) -> chat_pb2.Turn:
    base = {"index": 3, "user_message": "hi", "request_id": "r1", "model_version": "m", "template_version": "t",
            "answers": [chat_pb2.Answer(index=0, text="Hello there", finish_reason="stop")]}
    return chat_pb2.Turn(**{**base, **kw})


def test_replay_of_a_recorded_turn_is_a_whole_stream() -> None:
    evs = idempotency.replay(turn(), "c1", {}, started=False)
    assert [e.WhichOneof("event") for e in evs] == ["started", "delta", "done"]
    assert (evs[0].started.conversation_id, evs[0].started.turn_index, evs[0].started.request_id) == ("c1", 3, "r1")
    assert evs[1].delta.text == "Hello there"
    assert [r.reason for r in evs[2].done.finish_reasons] == ["stop"]
    assert evs[2].done.model_version == "m"


def test_replay_after_part_of_the_stream_sends_only_the_rest() -> None:
    evs = idempotency.replay(turn(), "c1", {0: len("Hello")}, started=True)
    assert [e.WhichOneof("event") for e in evs] == ["delta", "done"]
    assert evs[0].delta.text == " there"


def test_replay_of_moderated_and_blocked_turns_carries_the_notice() -> None:
    cut = idempotency.replay(turn(answers=[chat_pb2.Answer(index=0, text="Part", finish_reason="moderated")]),
                             "c1", {}, started=False)
    assert [e.WhichOneof("event") for e in cut] == ["started", "delta", "moderation", "done"]
    assert cut[2].moderation.stage == "output"
    blocked = idempotency.replay(turn(blocked=True, answers=[chat_pb2.Answer(
        index=0, text="I can't help with that.", finish_reason="blocked")]), "c1", {}, started=False)
    assert [e.WhichOneof("event") for e in blocked] == ["started", "moderation", "done"]
    assert blocked[1].moderation.message == "I can't help with that."


def test_replay_after_more_was_shown_than_recorded_withdraws_the_rest() -> None:
    """Stream-first: the stream showed text that moderation then cut; the record holds only the kept text."""
    cut = turn(answers=[chat_pb2.Answer(index=0, text="Part", finish_reason="moderated")])
    evs = idempotency.replay(cut, "c1", {0: len("Part of a leak")}, started=True)
    assert [e.WhichOneof("event") for e in evs] == ["retraction", "moderation", "done"]
    assert evs[0].retraction.kept_chars == 4


def reply(rid: str, **kw: object) -> events_pb2.ReplyEvent:
    return events_pb2.ReplyEvent(request_id=rid, conversation_id="c1", **kw)


def test_a_listener_attaching_late_gets_what_it_missed_then_every_reply() -> None:
    async def run() -> None:
        router = ReplyRouter(KafkaConfig(), "chat.replies.test", asyncio.get_running_loop())
        first = router.register("r1")
        router._deliver(reply("r1", started=chat_pb2.ChatStarted(turn_index=2)))
        router._deliver(reply("r1", text=events_pb2.ReleasedText(index=0, text="Hel")))
        router._deliver(reply("r1", text=events_pb2.ReleasedText(index=0, text="Hello")))
        router._deliver(reply("other", text=events_pb2.ReleasedText(index=0, text="not ours")))
        second = router.register("r1")
        assert router.listeners("r1") == 2
        late = [second.get_nowait() for _ in range(second.qsize())]
        assert [e.WhichOneof("reply") for e in late] == ["started", "text"]
        assert late[1].text.text == "Hello"  # the latest cumulative text stands for the earlier ones
        router._deliver(reply("r1", done=chat_pb2.ChatDone()))
        assert second.get_nowait().WhichOneof("reply") == "done"
        assert first.qsize() == 4  # the first listener saw every reply as it came
        router.unregister("r1", first)
        router.unregister("r1", second)
        assert router.listeners("r1") == 0
    asyncio.run(run())
