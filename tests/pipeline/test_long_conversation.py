"""A conversation longer than generation's KV slot is still answered, turn after turn.

Generation refuses a prompt that does not fit its slot (GENERATION_SLOT_TOKENS, prompt + answer,
2048 by default), while the model's context is 8192: the prompt stage must assemble within the
slot (dropping the oldest turns), or every turn after about 2,000 tokens of history is refused.
"""

from __future__ import annotations

import grpc
import pytest
from colloquy.v1 import chat_pb2, chat_pb2_grpc, common_pb2

from devtools.stack import Stack
from services.common.sampling import SLOT_TOKENS_DEFAULT

pytestmark = [pytest.mark.kafka, pytest.mark.pipeline]

DEV = [("authorization", "Bearer colloquy-dev-key")]
SHORT = common_pb2.SamplingParams(temperature=0.0, max_tokens=8)
# About 1,500 tokens of plain, varied sentences (under the 8 KiB message limit): two of them
# already overflow a 2,048-token slot.
LONG = " ".join(f"In row {i} of the garden we planted {i % 7 + 2} tulips and a small apple tree."
                for i in range(90))


@pytest.fixture(scope="module")
def chat(stack: Stack):
    with grpc.insecure_channel(stack.gateway) as ch:
        yield chat_pb2_grpc.ChatServiceStub(ch)


def test_turns_beyond_generations_slot_are_answered_with_the_oldest_turns_left_out(chat) -> None:
    assert len(LONG.encode()) < 8192
    conv = ""
    for message in (LONG, LONG, "How many tulips are in row 3?"):
        events = list(chat.Chat(chat_pb2.ChatRequest(conversation_id=conv, message=message, sampling=SHORT),
                                metadata=DEV, timeout=180))
        conv = events[0].started.conversation_id
        assert events[-1].WhichOneof("event") == "done", events[-1]
        assert events[-1].done.usage.prompt_tokens < SLOT_TOKENS_DEFAULT
    view = chat.GetConversation(chat_pb2.GetConversationRequest(conversation_id=conv), metadata=DEV)
    assert [t.index for t in view.turns] == [1, 2, 3]
