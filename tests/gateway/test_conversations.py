"""GetConversation (paged), ListConversations and DeleteConversation against a real gateway
process reading the real store (SQLite, filled by the real materializer from the real topic).

Turns are written to conversation.turns the way the pipeline writes them; the pipeline suite
(tests/pipeline/test_conversations.py) does the same through real chats and feedback.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import grpc
import pytest
from colloquy.v1 import chat_pb2, chat_pb2_grpc, events_pb2

from services.common import kafka_loop, topics, turns
from services.common.config import KafkaConfig
from tests.common.kafka_util import read_to_end
from tests.gateway.process import Gateway, running_gateway

pytestmark = [pytest.mark.kafka, pytest.mark.usefixtures("conversation_store")]

ALICE = [("authorization", "Bearer colloquy-dev-key-alice")]
DEV = [("authorization", "Bearer colloquy-dev-key")]


@pytest.fixture(scope="module")
def gateway(kafka_bootstrap: str) -> Iterator[Gateway]:
    with running_gateway(kafka_bootstrap, {"CHAT_USER_RATE_PER_MINUTE": "0"}) as gw:  # the tests poll
        yield gw


@pytest.fixture
def stub(gateway: Gateway) -> Iterator[chat_pb2_grpc.ChatServiceStub]:
    with grpc.insecure_channel(gateway.address) as ch:
        yield chat_pb2_grpc.ChatServiceStub(ch)


def _user(metadata: list[tuple[str, str]]) -> str:
    from services.common.auth import KeyRing

    who = KeyRing("deploy/dev/api-keys.yaml").identity(metadata[0][1].removeprefix("Bearer "))
    assert who is not None
    return who.user


def write_turns(bootstrap: str, user: str, conv: str, count: int, first_ms: int) -> None:
    """`count` finished turns of `conv`, one second apart, on the history topic."""
    producer = kafka_loop.make_producer(KafkaConfig(bootstrap_servers=bootstrap), "test-history")
    try:
        for i in range(1, count + 1):
            turn = chat_pb2.Turn(index=i, user_message=f"question {i} of {conv[:8]}", request_id=uuid.uuid4().hex,
                                 answers=[chat_pb2.Answer(index=0, text=f"answer {i}", finish_reason="stop")])
            turn.created_at.FromMilliseconds(first_ms + 1000 * i)
            record = events_pb2.TurnRecord(conversation_id=conv, user_id=user, turn=turn, prompt=f"prompt {i}")
            out = turns.turn_record_event(record)
            producer.send(out.topic, key=out.key.encode(), value=record.SerializeToString(), headers=out.headers(),
                          partition=out.partition)
        producer.flush()
    finally:
        producer.close()


def visible(stub: chat_pb2_grpc.ChatServiceStub, conv: str, count: int, timeout: float = 30.0) -> None:
    """Wait until the store (which reads the topic) shows all `count` turns of `conv`."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            got = stub.GetConversation(chat_pb2.GetConversationRequest(conversation_id=conv), metadata=ALICE,
                                       timeout=30)
            if len(got.turns) == count:
                return
        except grpc.RpcError as exc:
            if exc.code() not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE):  # unknown, or store behind
                raise
        assert time.monotonic() < deadline, f"{conv}: the store never showed {count} turns"
        time.sleep(0.1)


def _code(call, *args, **kw) -> tuple[grpc.StatusCode, str]:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as err:
        call(*args, **kw)
    return err.value.code(), err.value.details() or ""


def test_get_conversation_pages_and_refuses_bad_page_values(stub: chat_pb2_grpc.ChatServiceStub,
                                                           kafka_bootstrap: str) -> None:
    conv = str(uuid.uuid4())
    write_turns(kafka_bootstrap, _user(ALICE), conv, 5, turns.now_ms())
    visible(stub, conv, 5)
    seen: list[int] = []
    token = ""
    for _ in range(3):
        page = stub.GetConversation(chat_pb2.GetConversationRequest(conversation_id=conv, page_size=2,
                                                                    page_token=token), metadata=ALICE, timeout=30)
        seen += [t.index for t in page.turns]
        token = page.next_page_token
    assert seen == [1, 2, 3, 4, 5] and token == ""
    whole = stub.GetConversation(chat_pb2.GetConversationRequest(conversation_id=conv), metadata=ALICE, timeout=30)
    assert [t.index for t in whole.turns] == [1, 2, 3, 4, 5] and whole.next_page_token == ""

    get = stub.GetConversation
    code, msg = _code(get, chat_pb2.GetConversationRequest(conversation_id=conv, page_size=-1), metadata=ALICE)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and msg.startswith("page_size")
    code, msg = _code(get, chat_pb2.GetConversationRequest(conversation_id=conv, page_token="nonsense"),
                      metadata=ALICE)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and msg.startswith("page_token")
    other = str(uuid.uuid4())
    write_turns(kafka_bootstrap, _user(ALICE), other, 3, turns.now_ms())
    visible(stub, other, 3)
    theirs = get(chat_pb2.GetConversationRequest(conversation_id=other, page_size=1), metadata=ALICE, timeout=30)
    code, msg = _code(get, chat_pb2.GetConversationRequest(conversation_id=conv, page_token=theirs.next_page_token),
                      metadata=ALICE)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "another conversation" in msg
    code, _ = _code(get, chat_pb2.GetConversationRequest(conversation_id=conv), metadata=DEV)
    assert code == grpc.StatusCode.NOT_FOUND


def test_list_is_newest_first_paged_and_delete_is_the_owners_only(stub: chat_pb2_grpc.ChatServiceStub,
                                                                  kafka_bootstrap: str) -> None:
    # Other tests' conversations of the same user may be listed too: the checks look at these.
    convs = [str(uuid.uuid4()) for _ in range(3)]
    base = turns.now_ms() - 3_600_000
    for n, conv in enumerate(convs):  # convs[2] is the most recently active
        write_turns(kafka_bootstrap, _user(ALICE), conv, 2, base + n * 60_000)
    for conv in convs:
        visible(stub, conv, 2)

    listed: list[chat_pb2.ConversationSummary] = []
    token = ""
    while True:
        page = stub.ListConversations(chat_pb2.ListConversationsRequest(page_size=2, page_token=token),
                                      metadata=ALICE, timeout=30)
        assert len(page.conversations) <= 2
        listed += page.conversations
        token = page.next_page_token
        if not token:
            break
    mine = [c for c in listed if c.conversation_id in convs]
    assert [c.conversation_id for c in mine] == convs[::-1], "not newest first"
    assert mine[0].title == f"question 1 of {convs[2][:8]}"
    assert mine[0].last_activity_at.ToMilliseconds() == base + 2 * 60_000 + 2000
    assert mine[0].created_at.ToMilliseconds() == base + 2 * 60_000 + 1000
    assert len({c.conversation_id for c in listed}) == len(listed), "a conversation was listed twice"
    code, msg = _code(stub.ListConversations, chat_pb2.ListConversationsRequest(page_size=-5), metadata=ALICE)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and msg.startswith("page_size")

    victim = convs[1]
    code, _ = _code(stub.DeleteConversation, chat_pb2.DeleteConversationRequest(conversation_id=victim),
                    metadata=DEV)
    assert code == grpc.StatusCode.NOT_FOUND, "someone else's conversation was deleted (or revealed)"
    code, _ = _code(stub.DeleteConversation, chat_pb2.DeleteConversationRequest(conversation_id="not-a-uuid"),
                    metadata=ALICE)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    done = stub.DeleteConversation(chat_pb2.DeleteConversationRequest(conversation_id=victim), metadata=ALICE,
                                   timeout=30)
    assert done.deleted_turns == 2
    code, _ = _code(stub.GetConversation, chat_pb2.GetConversationRequest(conversation_id=victim), metadata=ALICE)
    assert code == grpc.StatusCode.NOT_FOUND
    code, _ = _code(stub.DeleteConversation, chat_pb2.DeleteConversationRequest(conversation_id=victim),
                    metadata=ALICE)
    assert code == grpc.StatusCode.NOT_FOUND, "deleting twice"
    listed_after = stub.ListConversations(chat_pb2.ListConversationsRequest(page_size=1000), metadata=ALICE,
                                          timeout=30).conversations
    assert victim not in {c.conversation_id for c in listed_after}
    assert {convs[0], convs[2]} <= {c.conversation_id for c in listed_after}

    partition = topics.partition_for(victim, topics.CONVERSATION_TURNS.partitions)
    stones = {r.key.decode() for r in read_to_end(kafka_bootstrap, topics.CONVERSATION_TURNS.name, [partition])
              if r.value is None and r.key and r.key.decode().startswith(victim)}
    assert stones == {f"{victim}/1", f"{victim}/2"}
