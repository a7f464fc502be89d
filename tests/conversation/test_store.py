"""The conversation store against real SQLite files and a real PostgreSQL server (each test twice)."""

from __future__ import annotations

import uuid

import pytest
import sqlalchemy as sa

from services.conversation import domain
from services.conversation.db import ConversationDB, OffsetsMoved, turns
from tests.conversation.records import Feeder, key, record


def _conv() -> str:
    return str(uuid.uuid4())


def _count_turns(db: ConversationDB, conv: str) -> int:
    with db.engine.connect() as c:
        return c.execute(sa.select(sa.func.count()).select_from(turns).where(turns.c.conversation_id == conv)).scalar()


def test_the_same_record_twice_is_stored_as_one_turn(store: ConversationDB) -> None:
    feed, conv = Feeder(store), _conv()
    rec = record(conv, "alice", 1, "hello")
    feed.put(rec)
    feed.put(rec)  # a redelivery (e.g. replay after a crash)
    assert _count_turns(store, conv) == 1
    page = store.get_conversation(conv, "alice")
    assert page is not None and [t.user_message for t in page.turns] == ["hello"]


def test_a_later_record_for_the_same_turn_replaces_it(store: ConversationDB) -> None:
    feed, conv = Feeder(store), _conv()
    feed.put(record(conv, "alice", 1, "hello", answer="first version"))
    feed.put(record(conv, "alice", 1, "hello", answer="second version", prompt="p2"))
    page = store.get_conversation(conv, "alice")
    assert page is not None and len(page.turns) == 1
    assert page.turns[0].answers[0].text == "second version"
    stored = store.get_turn(conv, "alice", 1)
    assert stored is not None and stored.prompt == "p2"


def test_offsets_are_stored_with_the_rows_and_a_stale_expected_offset_writes_nothing(store: ConversationDB) -> None:
    conv = _conv()
    rec = record(conv, "alice", 1)
    change = domain.change_for(key(rec), rec.SerializeToString(), None, 0, 0, 0)
    store.apply("g", "t", [change], {0: None}, {0: 1})
    assert store.stored_offsets("g", "t") == {0: 1}
    rec2 = record(conv, "alice", 2)
    change2 = domain.change_for(key(rec2), rec2.SerializeToString(), None, 0, 1, 0)
    with pytest.raises(OffsetsMoved):  # another writer stored offset 1 already
        store.apply("g", "t", [change2], {0: None}, {0: 2})
    with pytest.raises(OffsetsMoved):
        store.apply("g", "t", [change2], {0: 0}, {0: 2})
    assert not store.turn_recorded(conv, 2), "the rows of a refused batch were kept"
    assert store.stored_offsets("g", "t") == {0: 1}
    store.apply("g", "t", [change2], {0: 1}, {0: 2})
    assert store.turn_recorded(conv, 2) and store.stored_offsets("g", "t") == {0: 2}


def test_a_failure_before_commit_keeps_neither_rows_nor_offsets(store: ConversationDB) -> None:
    conv = _conv()
    rec = record(conv, "alice", 1)
    change = domain.change_for(key(rec), rec.SerializeToString(), None, 0, 0, 0)

    def crash() -> None:
        raise RuntimeError("killed before commit")

    with pytest.raises(RuntimeError):
        store.apply("g", "t", [change], {0: None}, {0: 1}, before_commit=crash)
    assert store.history(conv) is None and store.stored_offsets("g", "t") == {}


def test_turn_pages_are_in_order_and_a_token_resumes_after_its_page(store: ConversationDB) -> None:
    feed, conv = Feeder(store), _conv()
    feed.put(*[record(conv, "alice", i) for i in range(1, 21)])
    seen, token, pages = [], "", 0
    while True:
        page = store.get_conversation(conv, "alice", page_size=7, page_token=token)
        assert page is not None
        seen += [t.index for t in page.turns]
        pages += 1
        if not page.next_page_token:
            break
        token = page.next_page_token
    assert seen == list(range(1, 21)) and pages == 3
    first = store.get_conversation(conv, "alice", page_size=7)
    assert first is not None
    feed.put(record(conv, "alice", 21))  # a new turn does not shift pages already handed out
    again = store.get_conversation(conv, "alice", page_size=7, page_token=first.next_page_token)
    assert again is not None and [t.index for t in again.turns] == list(range(8, 15))


def test_conversations_are_listed_newest_first_in_pages(store: ConversationDB) -> None:
    feed = Feeder(store)
    convs = [_conv() for _ in range(5)]
    for i, conv in enumerate(convs):
        feed.put(record(conv, "alice", 1, f"question {i}", created_ms=1_000_000 + i * 1000))
    feed.put(record(_conv(), "bob", 1, "bob's", created_ms=9_000_000))
    page1 = store.list_conversations("alice", page_size=2)
    page2 = store.list_conversations("alice", page_size=2, page_token=page1.next_page_token)
    page3 = store.list_conversations("alice", page_size=2, page_token=page2.next_page_token)
    listed = [s.conversation_id for p in (page1, page2, page3) for s in p.conversations]
    assert listed == list(reversed(convs)) and page3.next_page_token == ""
    assert page1.conversations[0].title == "question 4"
    assert page1.conversations[0].last_activity_ms == 1_004_000


def test_a_list_token_does_not_repeat_a_conversation_that_moved_to_the_front(store: ConversationDB) -> None:
    feed = Feeder(store)
    convs = [_conv() for _ in range(4)]
    for i, conv in enumerate(convs):
        feed.put(record(conv, "alice", 1, created_ms=1_000_000 + i * 1000))
    page1 = store.list_conversations("alice", page_size=2)  # convs 3, 2
    feed.put(record(convs[0], "alice", 2, created_ms=5_000_000))  # the oldest gets a new turn
    page2 = store.list_conversations("alice", page_size=2, page_token=page1.next_page_token)
    assert [s.conversation_id for s in page2.conversations] == [convs[1]]
    assert store.list_conversations("alice").conversations[0].conversation_id == convs[0]


def test_another_users_conversation_is_invisible(store: ConversationDB) -> None:
    feed, conv = Feeder(store), _conv()
    feed.put(record(conv, "alice", 1, "private"))
    assert store.get_conversation(conv, "mallory") is None
    assert store.get_turn(conv, "mallory", 1) is None
    assert store.turn_by_request(conv, "mallory", f"req-{conv}-1") is None
    assert store.list_conversations("mallory").conversations == []
    assert store.delete_conversation(conv, "mallory") is False
    assert store.get_conversation(conv, "alice") is not None
    history = store.history(conv)
    assert history is not None and history.user_id == "alice"  # the prompt stage compares owners itself


def test_a_record_cannot_move_a_conversation_to_another_owner(store: ConversationDB) -> None:
    feed, conv = Feeder(store), _conv()
    feed.put(record(conv, "alice", 1, "mine"))
    feed.put(record(conv, "mallory", 2, "taken over"))
    assert store.get_conversation(conv, "mallory") is None
    page = store.get_conversation(conv, "alice")
    assert page is not None and [t.index for t in page.turns] == [1]


def test_a_tombstone_deletes_the_turn_and_the_last_one_deletes_the_conversation(store: ConversationDB) -> None:
    feed, conv = Feeder(store), _conv()
    feed.put(record(conv, "alice", 1, "first"), record(conv, "alice", 2, "second"))
    feed.tombstone(conv, 1)
    assert not store.turn_recorded(conv, 1) and store.turn_recorded(conv, 2)
    assert store.list_conversations("alice").conversations[0].title == "second"
    feed.tombstone(conv, 2)
    assert store.get_conversation(conv, "alice") is None
    assert store.list_conversations("alice").conversations == []
    history = store.history(conv)
    assert history is not None and history.deleted and history.turns == []
    assert store.stored_offsets("g", "t") == {0: feed.offset}


def test_a_deleted_conversation_is_not_brought_back_by_a_late_record(store: ConversationDB) -> None:
    feed, conv = Feeder(store), _conv()
    feed.put(record(conv, "alice", 1))
    assert store.delete_conversation(conv, "alice") is True
    assert store.delete_conversation(conv, "alice") is False
    feed.put(record(conv, "alice", 2))  # a turn that raced the deletion
    assert store.get_conversation(conv, "alice") is None
    assert not store.turn_recorded(conv, 2)


def test_the_title_is_the_first_message_on_one_line(store: ConversationDB) -> None:
    feed, conv = Feeder(store), _conv()
    feed.put(record(conv, "alice", 2, "second"))
    feed.put(record(conv, "alice", 1, "  What is\n\na   GPU?  " + "x" * 200))
    title = store.list_conversations("alice").conversations[0].title
    assert title.startswith("What is a GPU? xxx") and len(title) == domain.TITLE_CHARS


def test_history_has_every_turn_in_order_and_read_your_writes_sees_the_turn(store: ConversationDB) -> None:
    feed, conv = Feeder(store), _conv()
    assert not store.turn_recorded(conv, 1) and store.history(conv) is None
    feed.put(record(conv, "alice", 2), record(conv, "alice", 1), record(conv, "alice", 3))
    history = store.history(conv)
    assert history is not None and [t.index for t in history.turns] == [1, 2, 3] and not history.deleted
    assert store.turn_recorded(conv, 3)
    found = store.turn_by_request(conv, "alice", f"req-{conv}-2")
    assert found is not None and found.index == 2


def test_page_tokens_from_elsewhere_are_refused(store: ConversationDB) -> None:
    feed, a, b = Feeder(store), _conv(), _conv()
    feed.put(*[record(a, "alice", i) for i in range(1, 4)], record(b, "alice", 1))
    token_a = store.get_conversation(a, "alice", page_size=1)
    assert token_a is not None and token_a.next_page_token
    with pytest.raises(domain.InvalidPageToken):
        store.get_conversation(b, "alice", page_token=token_a.next_page_token)
    with pytest.raises(domain.InvalidPageToken):
        store.list_conversations("alice", page_token=token_a.next_page_token)
    with pytest.raises(domain.InvalidPageToken):
        store.list_conversations("alice", page_token="not-a-token!")
    with pytest.raises(ValueError):
        store.list_conversations("alice", page_size=-1)


def test_one_batch_has_the_outcome_of_its_records_applied_one_by_one(store: ConversationDB) -> None:
    feed, conv, other = Feeder(store), _conv(), _conv()
    feed.put(record(conv, "alice", 3, "third", created_ms=3000),
             record(conv, "mallory", 4, "not hers"),  # after alice's first record named the owner
             record(conv, "alice", 1, "first v1", created_ms=1000),
             record(other, "bob", 1, "bob's"),
             record(conv, "alice", 1, "first v2", answer="v2", created_ms=1000),
             record(conv, "alice", 2, "second", created_ms=2000))
    page = store.get_conversation(conv, "alice")
    assert page is not None and [t.index for t in page.turns] == [1, 2, 3]
    assert page.turns[0].answers[0].text == "v2"
    [summary] = store.list_conversations("alice").conversations
    assert (summary.title, summary.created_ms, summary.last_activity_ms) == ("first v2", 1000, 3000)
    assert store.get_conversation(conv, "mallory") is None
    assert [s.conversation_id for s in store.list_conversations("bob").conversations] == [other]


def test_owner_turn_indexes_and_idle_conversations_for_deletion(store: ConversationDB) -> None:
    """What DeleteConversation and the retention sweep read: the owner, the caller's turn keys,
    and live conversations idle since before a cutoff (oldest first, deleted ones left out)."""
    feed, old, new, gone = Feeder(store), _conv(), _conv(), _conv()
    feed.put(record(old, "alice", 1, created_ms=1_000), record(old, "alice", 2, created_ms=2_000),
             record(new, "bob", 1, created_ms=9_000), record(gone, "alice", 1, created_ms=500))
    assert store.delete_conversation(gone, "alice")
    assert store.owner(old) is not None and store.owner(old).user_id == "alice" and not store.owner(old).deleted
    assert store.owner(gone) is not None and store.owner(gone).deleted and store.owner(_conv()) is None
    assert store.turn_indexes(old, "alice") == [1, 2]
    assert store.turn_indexes(old, "bob") is None and store.turn_indexes(gone, "alice") is None
    assert store.idle_conversations(5_000) == [(old, "alice")]
    assert store.idle_conversations(10_000) == [(old, "alice"), (new, "bob")]
    assert store.idle_conversations(10_000, limit=1) == [(old, "alice")]
