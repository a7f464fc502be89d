"""client_request_id on the real stack: a retry never makes a second turn.

A retry after the answer finished replays the recorded turn; one that arrives while the first
stream runs on the same gateway joins it; one sent to a restarted gateway after the first gateway
was SIGKILLed mid-stream gets the same turn (the pipeline finished it without the dead gateway).
"""

from __future__ import annotations

import signal
import threading
import time
import uuid
from collections.abc import Iterator

import grpc
import pytest
from colloquy.v1 import chat_pb2, chat_pb2_grpc, common_pb2

from devtools.stack import Stack
from tests.gateway.process import Gateway

pytestmark = [pytest.mark.kafka, pytest.mark.pipeline]

ALICE = [("authorization", "Bearer colloquy-dev-key-alice")]
GREEDY = common_pb2.SamplingParams(temperature=0.0, max_tokens=32)


@pytest.fixture(scope="module")
def chat(stack: Stack) -> Iterator[chat_pb2_grpc.ChatServiceStub]:
    with grpc.insecure_channel(stack.gateway) as ch:
        yield chat_pb2_grpc.ChatServiceStub(ch)


def summary(evs: list[chat_pb2.ChatEvent]) -> tuple[str, int, str, str]:
    """(conversation, turn index, request id, answer text) of a whole stream."""
    assert evs[0].WhichOneof("event") == "started" and evs[-1].WhichOneof("event") == "done", evs
    s = evs[0].started
    text = "".join(e.delta.text for e in evs if e.WhichOneof("event") == "delta" and e.delta.index == 0)
    return s.conversation_id, s.turn_index, s.request_id, text


def ask(stub: chat_pb2_grpc.ChatServiceStub, message: str, key: str, conv: str = "",
        sampling: common_pb2.SamplingParams = GREEDY) -> list[chat_pb2.ChatEvent]:
    return list(stub.Chat(chat_pb2.ChatRequest(conversation_id=conv, message=message, sampling=sampling,
                                               client_request_id=key), metadata=ALICE, timeout=240))


def turns_of(stub: chat_pb2_grpc.ChatServiceStub, conv: str) -> list[chat_pb2.Turn]:
    return list(stub.GetConversation(chat_pb2.GetConversationRequest(conversation_id=conv),
                                     metadata=ALICE, timeout=30).turns)


def test_retry_after_the_answer_finished_replays_the_same_turn(chat) -> None:
    key = uuid.uuid4().hex
    first = summary(ask(chat, "What is the capital of France?", key))
    conv, index, rid, text = first
    assert index == 1 and text
    assert summary(ask(chat, "What is the capital of France?", key)) == first  # no conversation id: derived
    assert summary(ask(chat, "What is the capital of France?", key, conv)) == first  # with the id it got
    [turn] = turns_of(chat, conv)
    assert (turn.index, turn.request_id, turn.answers[0].text) == (1, rid, text)
    # A second turn in the same conversation is a new key; retrying it replays turn 2, not turn 1.
    key2 = uuid.uuid4().hex
    second = summary(ask(chat, "And of Italy?", key2, conv))
    assert second[:2] == (conv, 2)
    assert summary(ask(chat, "And of Italy?", key2, conv)) == second
    assert [t.index for t in turns_of(chat, conv)] == [1, 2]


def test_a_key_reused_for_another_message_is_invalid_argument(chat) -> None:
    key = uuid.uuid4().hex
    conv = summary(ask(chat, "Say hello.", key))[0]
    with pytest.raises(grpc.RpcError) as exc:
        ask(chat, "Say goodbye.", key, conv)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (exc.value.details() or "").startswith("client_request_id")
    assert len(turns_of(chat, conv)) == 1


def test_retry_while_the_first_stream_runs_joins_it(chat) -> None:
    key = uuid.uuid4().hex
    message = "Tell me a short story about a cat."
    sampling = common_pb2.SamplingParams(temperature=0.0, max_tokens=96)
    first_events: list[chat_pb2.ChatEvent] = []
    seen_text = threading.Event()

    def first() -> None:
        for ev in chat.Chat(chat_pb2.ChatRequest(message=message, sampling=sampling, client_request_id=key),
                            metadata=ALICE, timeout=240):
            first_events.append(ev)
            if ev.WhichOneof("event") == "delta":
                seen_text.set()
        seen_text.set()

    t = threading.Thread(target=first)
    t.start()
    assert seen_text.wait(240)
    retry = summary(ask(chat, message, key, sampling=sampling))
    t.join(240)
    original = summary(first_events)
    assert retry == original
    assert len(turns_of(chat, original[0])) == 1


@pytest.fixture
def own_gateway(stack: Stack) -> Iterator[Gateway]:
    """A second gateway on the stack's pipeline, ours to kill (the shared one serves other tests)."""
    env = {k: v for k, v in stack.env("gateway").items() if k not in ("GRPC_PORT", "METRICS_PORT", "INSTANCE_ID")}
    gw = Gateway(stack.bootstrap, env).start()
    try:
        yield gw
    finally:
        gw.stop()


@pytest.mark.timeout(600)
@pytest.mark.parametrize("replica", ["restarted", "another"])
def test_retry_after_the_gateway_is_killed_mid_stream_gets_the_same_turn(own_gateway: Gateway,
                                                                         replica: str) -> None:
    """"restarted": the same replica comes back (its reply topic still gets the first try's
    replies); "another": a replica with its own reply topic, which hears none of them and finds
    the turn in the history."""
    key = uuid.uuid4().hex
    message = "Write a long story about a dragon who learns to bake bread."
    sampling = common_pb2.SamplingParams(temperature=0.0, max_tokens=160)
    before: list[chat_pb2.ChatEvent] = []
    with grpc.insecure_channel(own_gateway.address) as ch:
        call = chat_pb2_grpc.ChatServiceStub(ch).Chat(
            chat_pb2.ChatRequest(message=message, sampling=sampling, client_request_id=key),
            metadata=ALICE, timeout=240)
        try:
            for ev in call:
                before.append(ev)
                if ev.WhichOneof("event") == "delta":
                    own_gateway.proc.signal(signal.SIGKILL)  # type: ignore[union-attr]
                    break
        except grpc.RpcError:
            pass
        own_gateway.proc.wait(30)  # type: ignore[union-attr]
    assert before and before[0].WhichOneof("event") == "started"
    started = before[0].started
    if replica == "another":
        own_gateway.instance = own_gateway.env["INSTANCE_ID"] = f"gwt{uuid.uuid4().hex[:8]}"
    own_gateway.start()  # same port; same instance id (reply topic) unless "another"
    with grpc.insecure_channel(own_gateway.address) as ch:
        stub = chat_pb2_grpc.ChatServiceStub(ch)
        t0 = time.monotonic()
        retry = summary(ask(stub, message, key, sampling=sampling))
        print(f"retry after SIGKILL answered in {time.monotonic() - t0:.1f} s", flush=True)
        assert retry[:3] == (started.conversation_id, started.turn_index, started.request_id)
        [turn] = turns_of(stub, started.conversation_id)
        assert (turn.request_id, turn.answers[0].text) == (started.request_id, retry[3])
        first_text = "".join(e.delta.text for e in before if e.WhichOneof("event") == "delta")
        assert retry[3].startswith(first_text)  # the same answer the killed stream had begun
