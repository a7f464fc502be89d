"""List, page and delete conversations end to end (issue 17): real chats through the whole stack
into the conversation store, feedback into the dataset, then DeleteConversation, which must leave
tombstones on conversation.turns and take the conversation's rows out of the feedback dataset."""

from __future__ import annotations

import os
import time
from pathlib import Path

import grpc
import pytest
from colloquy.v1 import chat_pb2, chat_pb2_grpc, common_pb2

from devtools.procs import Proc
from devtools.stack import Stack
from services.common import topics
from services.feedback import dataset
from tests.common.kafka_util import read_to_end

pytestmark = [pytest.mark.kafka, pytest.mark.pipeline]

ALICE = [("authorization", "Bearer colloquy-dev-key-alice")]
DEV = [("authorization", "Bearer colloquy-dev-key")]
SHORT = common_pb2.SamplingParams(temperature=0.0, max_tokens=8)
ROOT = Path(__file__).resolve().parents[2]
# The test stack's feedback sink writes the default dataset (services/feedback/config.py).
FEEDBACK_DIR = ROOT / os.environ.get("COLLOQUY_VAR", "var") / "feedback"


@pytest.fixture(scope="module")
def chat(stack: Stack):
    with grpc.insecure_channel(stack.gateway) as ch:
        yield chat_pb2_grpc.ChatServiceStub(ch)


def say(stub, message: str, conv: str = "") -> tuple[str, int]:
    evs = list(stub.Chat(chat_pb2.ChatRequest(conversation_id=conv, message=message, sampling=SHORT),
                         metadata=ALICE, timeout=120))
    assert evs[-1].WhichOneof("event") == "done", evs[-1]
    return evs[0].started.conversation_id, evs[0].started.turn_index


def wait(check, timeout: float, what: str, proc: Proc | None = None):  # type: ignore[no-untyped-def]
    """Poll `check` until it is truthy; on timeout the error carries `proc`'s log tail and threads."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out waiting for {what}{'' if proc is None else proc.diagnosis()}")
        time.sleep(0.5)


def code_of(call, request) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as err:
        call(request, metadata=ALICE, timeout=30)
    return err.value.code()


def test_list_page_and_delete_with_its_feedback(chat, stack: Stack) -> None:
    a, _ = say(chat, "Name a colour.")
    b, _ = say(chat, "Name a fruit.")
    c, _ = say(chat, "Name an animal.")
    say(chat, "Another colour?", a)
    _, third = say(chat, "And one more?", a)
    assert third == 3

    # GetConversation, one page at a time (read-your-writes: every turn is there after `done`).
    first = chat.GetConversation(chat_pb2.GetConversationRequest(conversation_id=a, page_size=2), metadata=ALICE)
    assert [t.index for t in first.turns] == [1, 2] and first.next_page_token
    rest = chat.GetConversation(chat_pb2.GetConversationRequest(conversation_id=a, page_size=2,
                                                                page_token=first.next_page_token), metadata=ALICE)
    assert [t.index for t in rest.turns] == [3] and rest.next_page_token == ""
    assert code_of(chat.GetConversation, chat_pb2.GetConversationRequest(conversation_id=a, page_size=-1)) \
        == grpc.StatusCode.INVALID_ARGUMENT

    # ListConversations: newest activity first, titled by the first message, paged. The store
    # holds every earlier run's conversations of this user too (it replays the whole topic): the
    # three just made are the newest.
    first_page = chat.ListConversations(chat_pb2.ListConversationsRequest(page_size=2), metadata=ALICE)
    assert [s.conversation_id for s in first_page.conversations] == [a, c], "not newest activity first"
    assert first_page.next_page_token
    second_page = chat.ListConversations(chat_pb2.ListConversationsRequest(
        page_size=2, page_token=first_page.next_page_token), metadata=ALICE)
    assert second_page.conversations[0].conversation_id == b
    assert not {s.conversation_id for s in second_page.conversations} & {a, c}, "listed twice"
    newest, fruit = first_page.conversations[0], second_page.conversations[0]
    assert fruit.title == "Name a fruit."
    assert newest.last_activity_at.ToMilliseconds() > newest.created_at.ToMilliseconds()
    assert code_of(chat.ListConversations, chat_pb2.ListConversationsRequest(page_token="x")) \
        == grpc.StatusCode.INVALID_ARGUMENT

    # Feedback on b reaches the dataset the RLHF job reads.
    chat.SubmitFeedback(chat_pb2.SubmitFeedbackRequest(conversation_id=b, turn_index=1, rating=chat_pb2.Rating(
        answer_index=0, thumbs_up=True, comment="deleted with its conversation")), metadata=ALICE, timeout=30)
    wait(lambda: [r for r in dataset.read(FEEDBACK_DIR).to_pylist() if r["conversation_id"] == b], 90,
         "the feedback row in the dataset",
         stack.procs["feedback"])

    # Someone else cannot delete it (nor learn it exists); the owner can, once.
    with pytest.raises(grpc.RpcError) as err:
        chat.DeleteConversation(chat_pb2.DeleteConversationRequest(conversation_id=b), metadata=DEV, timeout=30)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    deleted = chat.DeleteConversation(chat_pb2.DeleteConversationRequest(conversation_id=b), metadata=ALICE,
                                      timeout=30)
    assert deleted.deleted_turns == 1
    assert code_of(chat.GetConversation, chat_pb2.GetConversationRequest(conversation_id=b)) \
        == grpc.StatusCode.NOT_FOUND
    assert code_of(chat.DeleteConversation, chat_pb2.DeleteConversationRequest(conversation_id=b)) \
        == grpc.StatusCode.NOT_FOUND
    assert code_of(chat.SubmitFeedback, chat_pb2.SubmitFeedbackRequest(
        conversation_id=b, turn_index=1, rating=chat_pb2.Rating(answer_index=0, thumbs_up=False))) \
        == grpc.StatusCode.NOT_FOUND
    after = chat.ListConversations(chat_pb2.ListConversationsRequest(page_size=1000), metadata=ALICE)
    assert b not in {s.conversation_id for s in after.conversations}
    assert {a, c} <= {s.conversation_id for s in after.conversations}
    # A new turn in the deleted conversation is refused, not answered into the void.
    with pytest.raises(grpc.RpcError) as err:
        say(chat, "Still there?", b)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND

    # The log: a tombstone for its one key, on its partition; the dataset: its rows are gone.
    partition = topics.partition_for(b, topics.CONVERSATION_TURNS.partitions)
    stones = [r for r in read_to_end(stack.bootstrap, topics.CONVERSATION_TURNS.name, [partition])
              if r.key == f"{b}/1".encode() and r.value is None]
    assert len(stones) == 1
    wait(lambda: not [r for r in dataset.read(FEEDBACK_DIR).to_pylist() if r["conversation_id"] == b], 90,
         "the deleted conversation's feedback to leave the dataset", stack.procs["feedback"])

