"""A turn generation refuses frees its conversation at once: the retry is accepted and answered.

The refused turn is sent the way input moderation passes turns on (chat.moderated) with a
candidate count generation refuses (`sampling.n` above GENERATION_MAX_N; the gateway and the
prompt stage check nothing about it there), so the refusal is generation's own, on the real
stack; the retry then goes through the gateway like any client's.
"""

from __future__ import annotations

import time
import uuid

import grpc
import pytest
from colloquy.v1 import chat_pb2, chat_pb2_grpc, common_pb2, events_pb2

from devtools.stack import Stack
from services.common import events, topics, turns
from services.generation.config import EngineSettings
from tests.common.kafka_util import Tail, create, produce
from tests.prompt.kafka_helpers import collect

pytestmark = [pytest.mark.kafka, pytest.mark.pipeline]

DEV = [("authorization", "Bearer colloquy-dev-key")]
SHORT = common_pb2.SamplingParams(temperature=0.0, max_tokens=8)


@pytest.fixture(scope="module")
def chat(stack: Stack):
    with grpc.insecure_channel(stack.gateway) as ch:
        yield chat_pb2_grpc.ChatServiceStub(ch)


def ask(stub, message: str, conv: str = "") -> list[chat_pb2.ChatEvent]:
    return list(stub.Chat(chat_pb2.ChatRequest(conversation_id=conv, message=message, sampling=SHORT),
                          metadata=DEV, timeout=120))


def test_a_retry_right_after_generation_refused_a_turn_is_accepted_and_answered(
        chat, kafka_bootstrap: str) -> None:
    first = ask(chat, "Hello!")
    conv = first[0].started.conversation_id
    assert first[-1].WhichOneof("event") == "done"

    replies = f"t.replies.{uuid.uuid4().hex[:10]}"
    create(kafka_bootstrap, replies, partitions=1)
    unanswered = Tail(kafka_bootstrap, topics.CHAT_UNANSWERED.name)
    refused = events_pb2.TurnEvent(
        request_id=uuid.uuid4().hex, conversation_id=conv, user_id="dev", message="Tell me a joke.",
        sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=8, n=EngineSettings().max_n + 1),
        reply_topic=replies, deadline_unix_ms=turns.now_ms() + 120_000, accepted_unix_ms=turns.now_ms(),
        message_tokens=5, input_moderation=common_pb2.ModerationResult(
            action=common_pb2.MODERATION_ACTION_ALLOW, policy_version="test"))
    produce(kafka_bootstrap, topics.CHAT_MODERATED.name, [(conv, refused)])
    started, error = collect(kafka_bootstrap, replies, events_pb2.ReplyEvent,
                             lambda r: r.request_id == refused.request_id, 2, timeout=120, settle=0.2)
    assert started.started.turn_index == 2
    assert (error.error.code, error.error.stage) == ("INVALID_ARGUMENT", "generation"), error
    assert error.error.message.startswith("sampling.n:")

    # Today's turn would stay pending until its deadline (+5 s): every retry refused ABORTED.
    t0 = time.monotonic()
    retry = ask(chat, "Tell me a joke.", conv)
    assert retry[0].started.turn_index == 2, "the refused turn was never recorded: the retry takes its index"
    assert retry[-1].WhichOneof("event") == "done"
    assert time.monotonic() - t0 < 60
    try:
        notices = [events.decode(r.value, r.headers, events_pb2.TurnUnanswered) for r in unanswered.read()]
    finally:
        unanswered.close()
    assert [(n.request_id, n.code) for n in notices if n.conversation_id == conv] == [
        (refused.request_id, "INVALID_ARGUMENT")]
    view = chat.GetConversation(chat_pb2.GetConversationRequest(conversation_id=conv), metadata=DEV)
    assert [t.index for t in view.turns] == [1, 2] and view.turns[1].request_id != refused.request_id
