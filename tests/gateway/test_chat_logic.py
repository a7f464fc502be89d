"""The Chat stream's decisions without the stack: in-memory fakes of chat_stream's own interfaces
(Replies, History, Pipeline) stand for the reply router, the store and Kafka."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from colloquy.v1 import chat_pb2, events_pb2

from services.gateway.chat_stream import ChatEnd, ChatStream, Limits


class FakeReplies:
    def __init__(self, *events: events_pb2.ReplyEvent) -> None:
        self.queue: asyncio.Queue[events_pb2.ReplyEvent] = asyncio.Queue()
        for ev in events:
            self.queue.put_nowait(ev)

    async def get(self) -> events_pb2.ReplyEvent:
        return await self.queue.get()


class FakeHistory:
    def __init__(self, turn: chat_pb2.Turn | None = None, stored: bool = True) -> None:
        self.turn, self.stored = turn, stored
        self.lookups = 0
        self.stored_asked: list[tuple[str, int]] = []

    async def turn_by_request(self, conversation_id: str, user: str, request_id: str) -> chat_pb2.Turn | None:
        self.lookups += 1
        return self.turn

    async def turn_stored(self, conversation_id: str, index: int) -> bool:
        self.stored_asked.append((conversation_id, index))
        return self.stored


class FakePipeline:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.published: list[events_pb2.TurnEvent] = []
        self.gave_up: list[str] = []

    async def publish(self, turn: events_pb2.TurnEvent) -> None:
        if self.fail:
            raise ConnectionError("broker down")
        self.published.append(turn)

    def give_up(self, request_id: str, conversation_id: str, reason: str) -> None:
        self.gave_up.append(reason)


def started(index: int = 2) -> events_pb2.ReplyEvent:
    return events_pb2.ReplyEvent(request_id="r", started=chat_pb2.ChatStarted(conversation_id="c", turn_index=index,
                                                                             request_id="r"))


def text(t: str, index: int = 0) -> events_pb2.ReplyEvent:
    return events_pb2.ReplyEvent(request_id="r", text=events_pb2.ReleasedText(index=index, text=t))


def done() -> events_pb2.ReplyEvent:
    return events_pb2.ReplyEvent(request_id="r", done=chat_pb2.ChatDone(model_version="m"))


def notice() -> events_pb2.ReplyEvent:
    return events_pb2.ReplyEvent(request_id="r", moderation=chat_pb2.ModerationNotice(stage="input", message="careful"))


def stream(replies: FakeReplies, history: FakeHistory, pipeline: FakePipeline, *, keyed: bool = False,
           deadline_s: float = 5.0, idle_s: float = 5.0, check_s: float = 5.0, poll_s: float = 0.05) -> ChatStream:
    return ChatStream(replies, history, pipeline, conversation_id="c", user="ann", request_id="r",
                      limits=Limits(time.time() + deadline_s, idle_s, check_s, poll_s if keyed else None),
                      accepted=time.perf_counter())


TURN = events_pb2.TurnEvent(request_id="r", conversation_id="c", message="hi")


async def collect(s: ChatStream, turn: events_pb2.TurnEvent | None = TURN) -> list[chat_pb2.ChatEvent]:
    return [ev async for ev in s.run(turn)]


def described(evs: list[chat_pb2.ChatEvent]) -> list[str]:
    out = []
    for ev in evs:
        kind = ev.WhichOneof("event")
        out.append(f"delta:{ev.delta.index}:{ev.delta.text}" if kind == "delta"
                   else f"retraction:{ev.retraction.kept_chars}" if kind == "retraction" else kind)
    return out


def test_started_goes_first_cumulative_text_becomes_deltas_and_done_waits_for_the_store() -> None:
    replies = FakeReplies(notice(), started(), text("Hel"), text("Hel"), text("Hello"), text("Yo", 1),
                          started(), events_pb2.ReplyEvent(retraction=chat_pb2.ChatRetraction(index=0, kept_chars=9)),
                          events_pb2.ReplyEvent(retraction=chat_pb2.ChatRetraction(index=0, kept_chars=3)),
                          text("Help"), done())
    history, pipeline = FakeHistory(), FakePipeline()
    s = stream(replies, history, pipeline)
    evs = asyncio.run(collect(s))
    # The notice that came before `started` follows it; a repeated text or `started` sends nothing;
    # a retraction that cuts nothing sent is dropped; after a cut, text resumes from the kept length.
    assert described(evs) == ["started", "moderation", "delta:0:Hel", "delta:0:lo", "delta:1:Yo",
                              "retraction:3", "delta:0:p", "done"]
    assert history.stored_asked == [("c", 2)]  # read-your-writes before `done`
    assert pipeline.published == [TURN] and pipeline.gave_up == [] and s.finished


def test_done_still_comes_when_the_store_lags() -> None:
    history = FakeHistory(stored=False)
    evs = asyncio.run(collect(stream(FakeReplies(started(), done()), history, FakePipeline())))
    assert described(evs) == ["started", "done"] and history.stored_asked == [("c", 2)]


def test_a_retry_attached_to_a_held_stream_publishes_nothing() -> None:
    pipeline = FakePipeline()
    evs = asyncio.run(collect(stream(FakeReplies(started(), text("a"), done()), FakeHistory(), pipeline), None))
    assert described(evs) == ["started", "delta:0:a", "done"] and pipeline.published == []


def test_a_keyed_stream_holds_the_first_trys_replies_until_its_started() -> None:
    replies = FakeReplies(text("Hi"), text("Hi there"), started(), done())
    evs = asyncio.run(collect(stream(replies, FakeHistory(), FakePipeline(), keyed=True)))
    assert described(evs) == ["started", "delta:0:Hi", "delta:0: there", "done"]


def test_a_keyed_stream_with_no_replies_replays_its_turn_from_the_history() -> None:
    recorded = chat_pb2.Turn(index=4, request_id="r", model_version="m", answers=[
        chat_pb2.Answer(index=0, text="Hello there", finish_reason="stop")])
    history, pipeline = FakeHistory(turn=recorded), FakePipeline()
    s = stream(FakeReplies(started(4), text("Hello")), history, pipeline, keyed=True, poll_s=0.05)
    evs = asyncio.run(collect(s))
    assert described(evs) == ["started", "delta:0:Hello", "delta:0: there", "done"]  # only what was missing
    assert history.lookups >= 1 and s.finished and pipeline.gave_up == []


def test_an_unkeyed_stream_never_reads_the_history_and_stalls_out() -> None:
    history, pipeline = FakeHistory(turn=chat_pb2.Turn(index=1)), FakePipeline()
    with pytest.raises(ChatEnd) as end:
        asyncio.run(collect(stream(FakeReplies(started()), history, pipeline, idle_s=0.1)))
    assert end.value.status is grpc.StatusCode.UNAVAILABLE and "no progress" in end.value.message
    assert history.lookups == 0 and pipeline.gave_up == ["stalled"]


def test_a_turn_that_never_clears_the_checks_is_cancelled() -> None:
    pipeline = FakePipeline()
    t0 = time.monotonic()
    with pytest.raises(ChatEnd) as end:
        asyncio.run(collect(stream(FakeReplies(notice()), FakeHistory(), pipeline, check_s=0.1)))
    assert end.value.status is grpc.StatusCode.UNAVAILABLE and "not checked by moderation" in end.value.message
    assert pipeline.gave_up == ["checks-timeout"] and time.monotonic() - t0 < 2


def test_the_deadline_ends_the_stream_and_cancels_generation() -> None:
    pipeline = FakePipeline()
    with pytest.raises(ChatEnd) as end:
        asyncio.run(collect(stream(FakeReplies(started()), FakeHistory(), pipeline, deadline_s=0.1, idle_s=5,
                                   keyed=True, poll_s=0.03)))
    assert end.value.status is grpc.StatusCode.DEADLINE_EXCEEDED and pipeline.gave_up == ["deadline"]


def test_a_stage_error_ends_with_its_status_and_cancels_nothing() -> None:
    error = events_pb2.ReplyEvent(error=events_pb2.StageError(code="INVALID_ARGUMENT", message="too long",
                                                              stage="tokenizer"))
    pipeline = FakePipeline()
    with pytest.raises(ChatEnd) as end:
        asyncio.run(collect(stream(FakeReplies(started(), error), FakeHistory(), pipeline)))
    assert end.value.status is grpc.StatusCode.INVALID_ARGUMENT and pipeline.gave_up == []


def test_an_unpublished_turn_is_unavailable_and_reads_no_replies() -> None:
    replies = FakeReplies(started(), done())
    with pytest.raises(ChatEnd) as end:
        asyncio.run(collect(stream(replies, FakeHistory(), FakePipeline(fail=True))))
    assert end.value.status is grpc.StatusCode.UNAVAILABLE and replies.queue.qsize() == 2


def test_a_client_that_goes_away_cancels_generation_unless_the_turn_finished() -> None:
    async def cancelled_after(s: ChatStream, seen: int) -> None:
        got: list[chat_pb2.ChatEvent] = []

        async def consume() -> None:
            async for ev in s.run(TURN):
                got.append(ev)

        task = asyncio.ensure_future(consume())
        while len(got) < seen:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    pipeline = FakePipeline()
    asyncio.run(cancelled_after(stream(FakeReplies(started(), text("a")), FakeHistory(), pipeline), 2))
    assert pipeline.gave_up == ["client-cancelled"]
    slow = FakeHistory()
    slow_pipeline = FakePipeline()

    async def stalls(conversation_id: str, index: int) -> bool:  # the store is slow after `done`
        await asyncio.sleep(10)
        return True

    slow.turn_stored = stalls  # type: ignore[method-assign]
    asyncio.run(cancelled_after(stream(FakeReplies(started(), done()), slow, slow_pipeline), 1))
    assert slow_pipeline.gave_up == []  # `done` came: nothing left to stop


def test_a_client_that_goes_away_while_an_event_is_written_cancels_generation() -> None:
    """gRPC may cancel the handler while it writes the event this stream just yielded: the stream
    is then closed at its yield (GeneratorExit), not cancelled inside it, and must still stop
    generation."""
    async def closed_after_first_delta(s: ChatStream) -> None:
        relayed = s.run(TURN)
        async for ev in relayed:
            if ev.WhichOneof("event") == "delta":
                break
        await relayed.aclose()

    pipeline = FakePipeline()
    replies = FakeReplies(started(), text("a"), text("ab"))
    asyncio.run(closed_after_first_delta(stream(replies, FakeHistory(), pipeline)))
    assert pipeline.gave_up == ["client-cancelled"]
