"""Per-user limits at a real gateway process over gRPC (real Kafka; no other stage needed).

The per-user chat cap keeps one key from holding every slot while another user is still let in,
and the rate limit is applied before any lookup on every public RPC (so probing conversation ids
costs the caller's budget like anything else).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import grpc
import pytest
from colloquy.v1 import chat_pb2, chat_pb2_grpc, common_pb2

from tests.gateway.process import Gateway, running_gateway

pytestmark = [pytest.mark.kafka, pytest.mark.usefixtures("conversation_store")]

ALICE = [("authorization", "Bearer colloquy-dev-key-alice")]
BOB = [("authorization", "Bearer colloquy-dev-key-bob")]
LONG = chat_pb2.ChatRequest(message="Write a very long story about a dragon.",
                            sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=1000))


@pytest.fixture(scope="module")
def gateway(kafka_bootstrap: str) -> Iterator[Gateway]:
    env = {"CHAT_MAX_CONCURRENT_PER_USER": "1", "CHAT_USER_RATE_PER_MINUTE": "1", "CHAT_USER_BURST": "3"}
    with running_gateway(kafka_bootstrap, env) as gw:
        yield gw


def wait_active(gw: Gateway, n: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while (held := gw.metric("colloquy_gateway_active_chats")) != n:
        assert time.monotonic() < deadline, (f"the gateway holds {held} chats, not {n}; its log:\n"
                                             f"{gw.proc.output()[-3000:] if gw.proc else ''}")
        time.sleep(0.05)


def test_one_key_over_its_chat_cap_is_refused_while_another_user_is_admitted(gateway: Gateway) -> None:
    with grpc.insecure_channel(gateway.address) as ch:
        stub = chat_pb2_grpc.ChatServiceStub(ch)
        first = stub.Chat(LONG, metadata=ALICE, timeout=60)
        try:
            wait_active(gateway, 1)
            with pytest.raises(grpc.RpcError) as refused:
                list(stub.Chat(LONG, metadata=ALICE, timeout=60))
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "too many chats at once for this API key" in (refused.value.details() or "")
            other = stub.Chat(LONG, metadata=BOB, timeout=60)
            try:
                wait_active(gateway, 2)  # bob holds a slot of his own
            finally:
                other.cancel()
        finally:
            first.cancel()
        wait_active(gateway, 0)


def test_get_conversation_is_rate_limited_before_the_lookup(gateway: Gateway) -> None:
    with grpc.insecure_channel(gateway.address) as ch:
        stub = chat_pb2_grpc.ChatServiceStub(ch)
        codes = []
        for _ in range(5):
            try:
                stub.GetConversation(chat_pb2.GetConversationRequest(conversation_id=str(uuid.uuid4())),
                                     metadata=[("authorization", "Bearer colloquy-dev-key")], timeout=30)
            except grpc.RpcError as exc:
                codes.append(exc.code())
        # The burst of 3 is spent by any calls of this key; then refused before any lookup.
        assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes
        assert codes[-1] == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_submit_feedback_is_rate_limited_before_the_ownership_check(gateway: Gateway) -> None:
    with grpc.insecure_channel(gateway.address) as ch:
        stub = chat_pb2_grpc.ChatServiceStub(ch)
        request = chat_pb2.SubmitFeedbackRequest(conversation_id=str(uuid.uuid4()), turn_index=1,
                                                 rating=chat_pb2.Rating(answer_index=0, thumbs_up=True))
        errors = []
        for _ in range(5):
            try:
                stub.SubmitFeedback(request, metadata=BOB, timeout=30)
            except grpc.RpcError as exc:
                errors.append(exc)
        assert errors[-1].code() == grpc.StatusCode.RESOURCE_EXHAUSTED, [e.code() for e in errors]
        assert "retry after" in (errors[-1].details() or "")
        assert dict(errors[-1].trailing_metadata() or ()).get("retry-after")
