"""Classifying history records and page tokens (pure functions: no Kafka, no database)."""

from __future__ import annotations

import pytest

from services.conversation import domain
from tests.conversation.records import key, record


def test_a_turn_record_becomes_an_upsert_with_its_finish_time() -> None:
    rec = record("c1", "alice", 2, created_ms=1_234_567)
    change = domain.change_for(key(rec), rec.SerializeToString(), None, 4, 17, 99)
    assert isinstance(change, domain.UpsertTurn)
    assert (change.record.turn.index, change.partition, change.offset, change.created_ms) == (2, 4, 17, 1_234_567)


def test_a_turn_without_a_finish_time_takes_the_kafka_timestamp() -> None:
    rec = record("c1", "alice", 1)
    change = domain.change_for(key(rec), rec.SerializeToString(), None, 0, 0, 42_000)
    assert isinstance(change, domain.UpsertTurn) and change.created_ms == 42_000


def test_a_null_value_is_a_tombstone_for_the_keys_turn() -> None:
    assert domain.change_for(b"conv/with/slash/7", None, None, 1, 5, 0) == domain.DeleteTurn("conv/with/slash", 7, 1, 5)


@pytest.mark.parametrize("bad_key", [None, b"", b"no-index", b"conv/", b"conv/0", b"conv/x", b"/3", b"\xff/1"])
def test_a_tombstone_without_a_usable_key_is_poison(bad_key: bytes | None) -> None:
    assert isinstance(domain.change_for(bad_key, None, None, 0, 0, 0), domain.Poison)


def test_records_that_cannot_be_applied_are_poison() -> None:
    rec = record("c1", "alice", 1)
    wrong_type = [("event-type", b"colloquy.v1.TurnEvent")]
    assert isinstance(domain.change_for(key(rec), rec.SerializeToString(), wrong_type, 0, 0, 0), domain.Poison)
    assert isinstance(domain.change_for(key(rec), b"\xff\xff\xff", None, 0, 0, 0), domain.Poison)
    assert isinstance(domain.change_for(b"c1/2", rec.SerializeToString(), None, 0, 0, 0), domain.Poison)
    no_owner = record("c1", "", 1)
    assert isinstance(domain.change_for(key(no_owner), no_owner.SerializeToString(), None, 0, 0, 0), domain.Poison)


def test_page_tokens_round_trip_and_other_listings_tokens_are_refused() -> None:
    token = domain.encode_token("turns", "c1", 7)
    assert domain.decode_token(token, "turns", (str, int)) == ["c1", 7]
    with pytest.raises(domain.InvalidPageToken):
        domain.decode_token(token, "conversations", (int, str))
    with pytest.raises(domain.InvalidPageToken):
        domain.decode_token(domain.encode_token("turns", "c1", "7"), "turns", (str, int))


def test_page_size_defaults_clamps_and_refuses_negatives() -> None:
    assert domain.page_size(0) == domain.DEFAULT_PAGE_SIZE
    assert domain.page_size(10**6) == domain.MAX_PAGE_SIZE
    with pytest.raises(ValueError):
        domain.page_size(-1)
