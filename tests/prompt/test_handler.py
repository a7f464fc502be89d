"""The prompt stage's handler as a function over a real SQLite conversation store (no broker)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from colloquy.v1 import common_pb2, events_pb2

from services.common import events, kafka_loop, safety
from services.conversation import domain
from services.conversation.db import ConversationDB
from services.prompt.config import PromptConfig
from services.prompt.domain import Assembler
from services.prompt.pending import TurnTracker
from services.prompt.templates import TemplateSet
from services.prompt.worker import HistoryPrefetch, make_handler
from services.tokenizer.domain import TextTokenizer
from tests.prompt.kafka_helpers import record


class FakeHistory:
    """Stands in for StoreReader: a real migrated SQLite store, caught up with the topic or never
    (the broker-side wait is what is faked)."""

    def __init__(self, db: ConversationDB, caught_up: bool = True) -> None:
        self.db = db
        self.caught_up = caught_up
        self.waits: list[list[int]] = []

    def add(self, record: events_pb2.TurnRecord) -> None:
        self.db.apply("g", "t", [domain.UpsertTurn(record, 0, 0, 1_700_000_000_000)], {}, {})

    def wait_caught_up(self, partitions: list[int], timeout: float) -> bool:
        self.waits.append(partitions)
        return self.caught_up


@pytest.fixture
def db(tmp_path: Path) -> Iterator[ConversationDB]:
    store = ConversationDB(f"sqlite:///{tmp_path / 'conversations.db'}")
    store.migrate()
    yield store
    store.close()


def run(handler, turn: events_pb2.TurnEvent) -> list[events.OutEvent]:
    return list(handler(kafka_loop.Consumed(message=turn, key=turn.conversation_id, event_id="e",
                                            request_id=turn.request_id, traceparent="", topic="in",
                                            partition=0, offset=0)))


def make(tok: TextTokenizer, shipped: TemplateSet, history: FakeHistory):
    cfg = PromptConfig(topic_out="prompts")
    return make_handler(Assembler(tok, 8192), shipped, TurnTracker(60_000), history, cfg)  # type: ignore[arg-type]


ALLOWED = common_pb2.ModerationResult(action=common_pb2.MODERATION_ACTION_ALLOW, policy_version="p1")


def turn(rid: str, **kw: object) -> events_pb2.TurnEvent:
    kw.setdefault("input_moderation", ALLOWED)
    kw.setdefault("conversation_id", "c1")
    return events_pb2.TurnEvent(request_id=rid, user_id="u1", message="Hi", reply_topic="rt", **kw)


def test_history_not_caught_up_is_unavailable(tok: TextTokenizer, shipped: TemplateSet, db: ConversationDB) -> None:
    [out] = run(make(tok, shipped, FakeHistory(db, caught_up=False)), turn("r1"))
    assert out.topic == "rt"
    assert out.message.error.code == "UNAVAILABLE" and "try again" in out.message.error.message


def test_prompt_event_and_started_reply(tok: TextTokenizer, shipped: TemplateSet, db: ConversationDB) -> None:
    history = FakeHistory(db)
    history.add(record("c1", "u1", 1, "My dog is called Biscuit.", "Nice!"))
    prompt, started = run(make(tok, shipped, history), turn("r2"))
    assert (prompt.topic, prompt.key, prompt.request_id) == ("prompts", "c1", "r2")
    assert prompt.message.turn_index == 2 and "Biscuit" in prompt.message.prompt
    assert list(prompt.message.answer_stops) == list(shipped.get().answer_stops) != []
    assert started.topic == "rt" and started.message.started.turn_index == 2


def test_blocked_turn_with_several_candidates(tok: TextTokenizer, shipped: TemplateSet, db: ConversationDB) -> None:
    blocked = turn("r1", sampling=common_pb2.SamplingParams(n=2), input_moderation=common_pb2.ModerationResult(
        flagged=True, action=common_pb2.MODERATION_ACTION_BLOCK))
    rec, started, notice, done = run(make(tok, shipped, FakeHistory(db)), blocked)
    assert rec.topic == "conversation.turns" and rec.key == "c1/1"
    assert [a.index for a in rec.message.turn.answers] == [0, 1]
    assert [f.reason for f in done.message.done.finish_reasons] == ["blocked", "blocked"]
    assert started.message.started.turn_index == 1 and notice.message.moderation.stage == "input"


@pytest.mark.parametrize("categories, helped", [({"self-harm": True, "self-harm/instructions": True}, True),
                                                 ({"hate": True}, False)])
def test_a_message_blocked_for_self_harm_is_refused_with_where_to_find_help(
        tok: TextTokenizer, shipped: TemplateSet, db: ConversationDB, categories: dict, helped: bool) -> None:
    blocked = turn("r1", input_moderation=common_pb2.ModerationResult(
        flagged=True, action=common_pb2.MODERATION_ACTION_BLOCK, categories=categories))
    rec, _, notice, _ = run(make(tok, shipped, FakeHistory(db)), blocked)
    refusal = shipped.get().refusal
    expected = f"{refusal} {safety.CRISIS_LINE}" if helped else refusal
    assert [a.text for a in rec.message.turn.answers] == [expected]
    assert notice.message.moderation.message == expected


def test_turn_nobody_can_be_told_about_is_poison(tok: TextTokenizer, shipped: TemplateSet, db: ConversationDB) -> None:
    with pytest.raises(events.PoisonEvent):
        run(make(tok, shipped, FakeHistory(db)), events_pb2.TurnEvent(request_id="r1", conversation_id="c1"))


@pytest.mark.parametrize("moderation", [None, common_pb2.ModerationResult(flagged=False, policy_version="p1")],
                         ids=["no-result", "no-action"])
def test_turn_without_an_input_moderation_decision_is_refused_not_assembled(
        tok: TextTokenizer, shipped: TemplateSet, db: ConversationDB,
        moderation: common_pb2.ModerationResult | None) -> None:
    """Fail closed: a turn that skipped input moderation is answered INTERNAL, never prompted,
    and claims no turn index (the conversation's next turn is still 1)."""
    history = FakeHistory(db)
    handler = make(tok, shipped, history)
    unmoderated = turn("r1")
    unmoderated.ClearField("input_moderation")
    if moderation is not None:
        unmoderated.input_moderation.CopyFrom(moderation)
    [out] = run(handler, unmoderated)
    assert out.topic == "rt" and out.message.error.code == "INTERNAL"
    assert out.message.error.message == "the message was not checked by moderation, so it was not answered"
    prompt, started = run(handler, turn("r2"))
    assert prompt.message.turn_index == 1 and started.message.started.turn_index == 1


@pytest.mark.parametrize("case", ["someone_elses", "deleted"])
def test_a_conversation_that_is_not_the_callers_is_not_found(
        tok: TextTokenizer, shipped: TemplateSet, db: ConversationDB, case: str) -> None:
    """Another user's conversation, or the caller's deleted one (a turn there would never be
    recorded), is NOT_FOUND, worded the same either way."""
    history = FakeHistory(db)
    history.add(record("c1", "mallory" if case == "someone_elses" else "u1", 1, "Hello", "Hi"))
    if case == "deleted":
        assert db.delete_conversation("c1", "u1")
    [out] = run(make(tok, shipped, history), turn("r1"))
    assert out.topic == "rt" and out.message.error.code == "NOT_FOUND"
    assert out.message.error.message == "conversation not found"


def test_a_prefetched_batch_waits_once_and_answers_as_lookups_one_by_one(
        tok: TextTokenizer, shipped: TemplateSet, db: ConversationDB) -> None:
    """The stage's `prepare` looks every conversation of a batch up behind one read-your-writes
    wait; each record then gets what its own lookup would have given (history, NOT_FOUND)."""
    history = FakeHistory(db)
    history.add(record("c1", "u1", 1, "My dog is called Biscuit.", "Nice!"))
    history.add(record("c2", "mallory", 1, "Hello", "Hi"))
    batch = [turn("r1"), turn("r2", conversation_id="c2"), turn("r3", conversation_id="c3")]
    cfg = PromptConfig(topic_out="prompts")
    prefetch = HistoryPrefetch(history, cfg)  # type: ignore[arg-type]
    handler = make_handler(Assembler(tok, 8192), shipped, TurnTracker(60_000), history, cfg,  # type: ignore[arg-type]
                           prefetch=prefetch)
    prefetch(batch)
    assert len(history.waits) == 1 and len(prefetch.found) == 3
    (p1, _), [gone], (p3, _) = (run(handler, t) for t in batch)
    assert len(history.waits) == 1  # no record waited again
    assert p1.message.turn_index == 2 and "Biscuit" in p1.message.prompt
    assert gone.message.error.code == "NOT_FOUND"
    assert p3.message.turn_index == 1
    # Unprepared (a record prepare skipped), the same answers, one wait each.
    alone = make(tok, shipped, history)
    assert [o.message.WhichOneof("reply") if o.topic == "rt" else o.message.turn_index
            for t in [turn("r4", conversation_id="c2"), turn("r5", conversation_id="c4")]
            for o in run(alone, t)] == ["error", 1, "started"]
    assert len(history.waits) == 3


def test_a_batch_whose_shared_wait_fails_is_answered_unavailable_without_waiting_again(
        tok: TextTokenizer, shipped: TemplateSet, db: ConversationDB) -> None:
    """The history behind for the whole wait: every turn of the batch is UNAVAILABLE ("try
    again"), after the one shared wait, not one more wait per turn."""
    history = FakeHistory(db, caught_up=False)
    cfg = PromptConfig(topic_out="prompts")
    prefetch = HistoryPrefetch(history, cfg)  # type: ignore[arg-type]
    handler = make_handler(Assembler(tok, 8192), shipped, TurnTracker(60_000), history, cfg,  # type: ignore[arg-type]
                           prefetch=prefetch)
    batch = [turn("r1"), turn("r2", conversation_id="c2"), turn("r3", conversation_id="c3")]
    prefetch(batch)
    replies = [out for t in batch for out in run(handler, t)]
    assert [r.message.error.code for r in replies] == ["UNAVAILABLE"] * 3
    assert all("try again" in r.message.error.message for r in replies)
    assert len(history.waits) == 1
