"""A stage's internal failure text never reaches a public caller (real gateway process, real Kafka).

The test plays the failing stage: it reads the gateway's TurnEvent from chat.requests and answers
on the gateway's reply topic with the kind of StageError generation sends when its stream breaks.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator

import grpc
import pytest
from colloquy.v1 import chat_pb2, chat_pb2_grpc, events_pb2

from services.common import events, topics, turns
from tests.common.kafka_util import Tail, produce
from tests.gateway.process import Gateway, running_gateway

pytestmark = [pytest.mark.kafka, pytest.mark.usefixtures("conversation_store")]

DEV = [("authorization", "Bearer colloquy-dev-key")]
INTERNAL_TEXT = "generation stream broke: RayActorError('The actor died unexpectedly at 10.1.2.3:6379, pid 4242')"


@pytest.fixture(scope="module")
def gateway(kafka_bootstrap: str) -> Iterator[Gateway]:
    with running_gateway(kafka_bootstrap) as gw:
        yield gw


def the_turn(tail: Tail, marker: str, timeout: float = 60.0) -> events_pb2.TurnEvent:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for rec in tail.read(settle=0.2):
            turn = events.decode(rec.value, rec.headers, events_pb2.TurnEvent)
            if marker in turn.message:
                return turn
    raise AssertionError("the gateway never published the turn")


@pytest.mark.parametrize("code", ["UNAVAILABLE", "INTERNAL"])
def test_stage_failure_detail_stays_in_the_log_and_the_caller_gets_a_plain_sentence(
        gateway: Gateway, kafka_bootstrap: str, code: str) -> None:
    marker = uuid.uuid4().hex
    tail = Tail(kafka_bootstrap, topics.CHAT_REQUESTS.name)
    caught: list[grpc.RpcError] = []

    def chat() -> None:
        with grpc.insecure_channel(gateway.address) as ch:
            try:
                list(chat_pb2_grpc.ChatServiceStub(ch).Chat(
                    chat_pb2.ChatRequest(message=f"Hello {marker}"), metadata=DEV, timeout=60))
            except grpc.RpcError as exc:
                caught.append(exc)

    caller = threading.Thread(target=chat)
    caller.start()
    try:
        turn = the_turn(tail, marker)
    finally:
        tail.close()
    failure = turns.reply_error(turn, code, INTERNAL_TEXT, "generation")
    produce(kafka_bootstrap, failure.topic, [(failure.key, failure.message)])
    caller.join(60)
    [exc] = caught
    details = exc.details() or ""
    assert "RayActorError" not in details and "10.1.2.3" not in details, details
    hint = dict(exc.trailing_metadata() or ()).get("retry-after")
    if code == "UNAVAILABLE":
        assert exc.code() == grpc.StatusCode.UNAVAILABLE
        assert "retry" in details
        assert hint == "2"  # `colloquy chat` and the web page wait this long and send it again
    else:
        assert exc.code() == grpc.StatusCode.INTERNAL
        assert turn.request_id in details  # the caller can quote it; the log has the detail
        assert hint is None
    assert INTERNAL_TEXT in gateway.proc.output()  # type: ignore[union-attr]
