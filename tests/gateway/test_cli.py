"""The terminal client: a stream-first retraction, and a turn refused with a retry hint (a stub stands
in for the gateway's stub)."""

from __future__ import annotations

import io

import grpc
import pytest
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


class _Refused(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, trailers: tuple = ()) -> None:
        self._code, self._trailers = code, trailers

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return "this conversation's history is still being saved; retry in a few seconds"

    def trailing_metadata(self) -> tuple:
        return self._trailers


class _RefusingStub(_Stub):
    """Refuses the first `refusals` calls before any event, then streams `events`."""

    def __init__(self, events: list[chat_pb2.ChatEvent], refusals: int, error: _Refused) -> None:
        super().__init__(events)
        self.refusals, self.error, self.calls = refusals, error, 0

    def Chat(self, request, metadata, timeout):  # type: ignore[no-untyped-def]
        self.calls += 1
        if self.calls <= self.refusals:
            raise self.error
        return iter(self.events)


DONE = [chat_pb2.ChatEvent(started=chat_pb2.ChatStarted(conversation_id="c", turn_index=2)),
        chat_pb2.ChatEvent(delta=chat_pb2.ChatDelta(text="Biscuit.")), chat_pb2.ChatEvent(done=chat_pb2.ChatDone())]


@pytest.fixture
def slept(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The retry waits, recorded instead of slept."""
    waits: list[float] = []
    monkeypatch.setattr(cli.time, "sleep", waits.append)
    return waits


def test_a_turn_refused_with_a_retry_hint_before_any_event_is_sent_again(slept: list[float]) -> None:
    stub = _RefusingStub(DONE, 2, _Refused(grpc.StatusCode.UNAVAILABLE, (("retry-after", "2"),)))
    out = io.StringIO()
    assert cli.stream_turn(stub, "k", "c", "What is my dog's name?", common_pb2.SamplingParams(), out=out) == ("c", 2)
    assert stub.calls == 3 and out.getvalue().count("retrying in 2s") == 2 and "Biscuit." in out.getvalue()
    assert slept == [2, 2]


@pytest.mark.parametrize("error", [_Refused(grpc.StatusCode.UNAVAILABLE),  # no hint: not known to be safe
                                   _Refused(grpc.StatusCode.NOT_FOUND, (("retry-after", "1"),))])
def test_other_refusals_and_too_many_are_not_retried(error: _Refused, slept: list[float]) -> None:
    stub = _RefusingStub(DONE, 1, error)
    with pytest.raises(grpc.RpcError):
        cli.stream_turn(stub, "k", "c", "hi", common_pb2.SamplingParams(), out=io.StringIO())
    assert stub.calls == 1
    hinted = _RefusingStub(DONE, 5, _Refused(grpc.StatusCode.UNAVAILABLE, (("retry-after", "1"),)))
    with pytest.raises(grpc.RpcError):
        cli.stream_turn(hinted, "k", "c", "hi", common_pb2.SamplingParams(), out=io.StringIO(), retries=3)
    assert hinted.calls == 4


def test_rank_arguments_give_the_order_and_its_ties() -> None:
    assert cli.parse_ranking(" 2 0=1") == chat_pb2.Ranking(order=[2, 0, 1], tied_with_next=[False, True])
    assert cli.parse_ranking("1 0") == chat_pb2.Ranking(order=[1, 0])
    assert cli.parse_ranking("0=1=2 3") == chat_pb2.Ranking(order=[0, 1, 2, 3], tied_with_next=[True, True, False])
    for bad in ("", "1 x", "1 =0"):
        with pytest.raises(ValueError, match="/rank"):
            cli.parse_ranking(bad)
