"""Turn index assignment: one turn at a time, stable indexes on redelivery, expiry."""

from __future__ import annotations

import pytest
from colloquy.v1 import chat_pb2

from services.prompt.pending import ConversationNotFound, TurnInProgress, TurnTracker

NOW = 1_000_000


def recorded(*indexes: int, request_ids: dict[int, str] | None = None) -> dict[int, chat_pb2.Turn]:
    ids = request_ids or {}
    return {i: chat_pb2.Turn(index=i, request_id=ids.get(i, f"old-{i}")) for i in indexes}


def claim(t: TurnTracker, rid: str, conv: str = "c1", user: str = "u1", owner: str | None = "u1",
          rec: dict | None = None, now: int = NOW, blocked: bool = False, deadline: int = 0):
    rec = {} if rec is None else rec
    return t.assign(request_id=rid, conversation_id=conv, user_id=user, owner=owner, recorded=rec,
                    now_ms=now, expires_ms=t.expiry(now, deadline), blocked=blocked)


def test_first_turn_of_a_new_conversation_is_one() -> None:
    assert claim(TurnTracker(60_000), "r1", owner=None).index == 1


def test_next_index_follows_the_history() -> None:
    assert claim(TurnTracker(60_000), "r3", rec=recorded(1, 2)).index == 3


def test_a_second_turn_while_one_is_answered_is_refused() -> None:
    t = TurnTracker(60_000)
    claim(t, "r1", rec=recorded(1, 2))
    with pytest.raises(TurnInProgress):
        claim(t, "r2", rec=recorded(1, 2))
    # Other conversations are not affected.
    assert claim(t, "r9", conv="c2", owner=None).index == 1


def test_redelivery_keeps_the_index() -> None:
    t = TurnTracker(60_000)
    first = claim(t, "r1", rec=recorded(1))
    again = claim(t, "r1", rec=recorded(1))
    assert (first.index, first.redelivered) == (2, False)
    assert (again.index, again.redelivered, again.already_recorded) == (2, True, False)


def test_once_recorded_the_next_turn_goes_on_and_a_replay_is_recognised() -> None:
    t = TurnTracker(60_000)
    claim(t, "r2", rec=recorded(1))
    after = recorded(1, 2, request_ids={2: "r2"})
    assert claim(t, "r3", rec=after).index == 3
    assert len(t) == 1  # r2's claim was released when its record showed up
    replay = claim(t, "r2", rec=after)
    assert (replay.index, replay.already_recorded) == (2, True)


def test_blocked_turns_take_an_index_but_do_not_block_the_next() -> None:
    t = TurnTracker(60_000)
    assert claim(t, "r1", owner=None, blocked=True).index == 1
    # The blocked turn's record may not be visible yet: the next one still gets index 2.
    assert claim(t, "r2", owner=None).index == 2


def test_a_turn_never_recorded_stops_counting_after_its_deadline_or_the_ttl() -> None:
    t = TurnTracker(60_000, deadline_grace_ms=1000)
    claim(t, "r1", rec=recorded(1), deadline=NOW + 5000)
    with pytest.raises(TurnInProgress):
        claim(t, "r2", rec=recorded(1), now=NOW + 5999)
    assert claim(t, "r2", rec=recorded(1), now=NOW + 6001).index == 2
    claim(t, "r3", conv="c2", owner=None)  # no deadline: the TTL
    with pytest.raises(TurnInProgress):
        claim(t, "r4", conv="c2", owner=None, now=NOW + 59_000)
    assert claim(t, "r4", conv="c2", owner=None, now=NOW + 60_001).index == 1


def test_someone_elses_conversation_in_flight_is_not_found() -> None:
    t = TurnTracker(60_000)
    claim(t, "r1", owner=None, user="alice")
    with pytest.raises(ConversationNotFound):
        claim(t, "r2", owner=None, user="mallory")
    with pytest.raises(ConversationNotFound):
        t.peek(conversation_id="c1", user_id="mallory", owner=None, recorded={}, now_ms=NOW)


def test_peek_and_release_claim_nothing() -> None:
    t = TurnTracker(60_000)
    assert t.peek(conversation_id="c1", user_id="u1", owner="u1", recorded=recorded(1), now_ms=NOW) == 2
    assert len(t) == 0
    claim(t, "r2", rec=recorded(1))
    assert t.peek(conversation_id="c1", user_id="u1", owner="u1", recorded=recorded(1), now_ms=NOW) == 3
    t.release("r2")
    assert claim(t, "r3", rec=recorded(1)).index == 2


def test_a_turn_generation_gave_up_on_frees_its_conversation_at_once() -> None:
    t = TurnTracker(60_000)
    claim(t, "r2", rec=recorded(1), deadline=NOW + 120_000)
    assert not t.forget_unanswered("r2", "other-conversation"), "only the conversation it names"
    assert not t.forget_unanswered("r9", "c1"), "an unknown request frees nothing"
    with pytest.raises(TurnInProgress):
        claim(t, "r3", rec=recorded(1))
    assert t.forget_unanswered("r2", "c1")
    assert claim(t, "r3", rec=recorded(1)).index == 2, "the retry takes the unrecorded turn's index"
    assert not t.forget_unanswered("r2", "c1"), "a second notice changes nothing"
