"""Two gateways on one stack (issue 22 item 3): replies find the gateway that holds the stream,
and a SIGKILLed gateway takes down only its own streams.

The second gateway joins the package's running stack (Stack.add_replica: its own port,
INSTANCE_ID and reply topic `chat.replies.<instance>`), so no second stack is started; chats are
dealt round-robin over the two addresses, as a round-robin balancer in front of them would."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from colloquy.v1 import chat_pb2, chat_pb2_grpc, common_pb2, events_pb2

from devtools.stack import Stack
from services.common import events, topics
from tests.common.kafka_util import Tail

pytestmark = [pytest.mark.kafka, pytest.mark.pipeline]

DEV = [("authorization", "Bearer colloquy-dev-key")]


@pytest.fixture(scope="module")
def gateways(stack: Stack) -> Iterator[list[str]]:
    """The process names of the two gateways; the second is removed after the module."""
    t0 = time.monotonic()
    second = stack.add_replica("gateway")
    print(f"{second} SERVING {time.monotonic() - t0:.1f} s after its start", flush=True)
    try:
        yield ["gateway", second]
    finally:
        if second in stack.procs:
            stack.remove_replica(second)


class Stream:
    """One Chat call on a thread: its events as they come, and how it ended."""

    def __init__(self, addr: str, message: str, max_tokens: int) -> None:
        self.addr = addr
        self.events: list[chat_pb2.ChatEvent] = []
        self.error: grpc.RpcError | None = None
        self.ended_at = 0.0
        self.ended = threading.Event()
        self._req = chat_pb2.ChatRequest(message=message, sampling=common_pb2.SamplingParams(
            temperature=0.0, max_tokens=max_tokens))
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        try:
            with grpc.insecure_channel(self.addr) as ch:
                for ev in chat_pb2_grpc.ChatServiceStub(ch).Chat(self._req, metadata=DEV, timeout=240):
                    self.events.append(ev)
        except grpc.RpcError as exc:
            self.error = exc
        finally:
            self.ended_at = time.monotonic()
            self.ended.set()

    def kinds(self) -> list[str]:
        return [e.WhichOneof("event") for e in self.events]

    @property
    def conversation(self) -> str:
        return self.events[0].started.conversation_id

    @property
    def done(self) -> bool:
        return self.ended.is_set() and self.error is None and self.kinds()[-1:] == ["done"]


def _addr(stack: Stack, name: str) -> str:
    return f"127.0.0.1:{stack.ports[name]}"


def _reply_topic(stack: Stack, name: str) -> str:
    return topics.reply_topic(stack.env(name)["INSTANCE_ID"]).name


def _conversations_on(tail: Tail) -> set[str]:
    return {events.decode(r.value, r.headers, events_pb2.ReplyEvent).conversation_id for r in tail.read(settle=1.0)}


def test_each_stream_completes_on_its_gateway_through_its_reply_topic(stack: Stack, gateways: list[str]) -> None:
    tails = {g: Tail(stack.bootstrap, _reply_topic(stack, g)) for g in gateways}
    try:
        streams = [Stream(_addr(stack, gateways[i % 2]), f"Name a colour, please ({i}).", 8) for i in range(6)]
        for s in streams:
            assert s.ended.wait(240), f"a chat on {s.addr} did not end"
        for s in streams:
            assert s.done, (s.addr, s.kinds(), s.error)
            assert s.kinds()[0] == "started"
        by_gateway = {g: {s.conversation for s in streams if s.addr == _addr(stack, g)} for g in gateways}
        seen = {g: _conversations_on(tail) for g, tail in tails.items()}
    finally:
        for tail in tails.values():
            tail.consumer.close()
    first, second = gateways
    # Each gateway's replies went to its own topic, none to the other's.
    assert by_gateway[first] <= seen[first] and not by_gateway[first] & seen[second], seen
    assert by_gateway[second] <= seen[second] and not by_gateway[second] & seen[first], seen


def test_a_sigkilled_gateway_ends_only_its_own_streams(stack: Stack, gateways: list[str]) -> None:
    first, second = gateways
    addrs = {g: _addr(stack, g) for g in gateways}
    streams = [Stream(addrs[gateways[i % 2]], f"Tell me a long story about a lighthouse keeper ({i}).", 64)
               for i in range(4)]
    mine = [s for s in streams if s.addr == addrs[first]]
    theirs = [s for s in streams if s.addr == addrs[second]]
    # Mid-stream: every chat has started on its gateway and none of the second's has ended.
    deadline = time.monotonic() + 180
    while not all(s.events or s.ended.is_set() for s in streams):
        assert time.monotonic() < deadline, [s.kinds() for s in streams]
        time.sleep(0.05)
    assert not any(s.ended.is_set() for s in theirs), [(s.kinds(), s.error) for s in theirs]
    in_flight = sum(not s.ended.is_set() for s in mine)
    killed_at = time.monotonic()
    stack.remove_replica(second, signal.SIGKILL, timeout=10)
    for s in theirs:  # the killed gateway's clients hear at once that their stream is gone
        assert s.ended.wait(30), "a stream of the killed gateway hung"
        assert s.error is not None and s.error.code() == grpc.StatusCode.UNAVAILABLE, (s.kinds(), s.error)
    for s in mine:
        assert s.ended.wait(240), "a stream of the surviving gateway did not end"
        assert s.done and s.kinds()[0] == "started", (s.kinds(), s.error)
    failed_in = max(s.ended_at for s in theirs) - killed_at
    print(f"gateway SIGKILLed with {len(theirs)} of its streams and {in_flight} of the other's in flight; "
          f"its streams failed within {failed_in:.2f} s, the other's completed")
    assert in_flight, "the surviving gateway's streams had all ended before the kill: nothing was shown"
    # The surviving gateway still takes new chats.
    after = Stream(addrs[first], "Name a fruit, please.", 8)
    assert after.ended.wait(240) and after.done, (after.kinds(), after.error)
