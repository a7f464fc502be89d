"""The gateway's wait before `done` (read-your-writes) over a real SQLite store, no broker: it
returns once the turn is stored (written here by another thread, as the materializer would) and
gives up after its bound; and a conversation the store does not hold is missing only once the
store has caught up with its partition."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from services.conversation import domain
from services.conversation.db import ConversationDB
from services.gateway import servicer as servicer_mod
from services.gateway.servicer import ChatServicer, StoreBehind
from tests.conversation.records import record


def test_done_waits_for_the_turn_in_the_store_and_gives_up_after_its_bound(tmp_path: Path, monkeypatch) -> None:
    db = ConversationDB(f"sqlite:///{tmp_path / 'conversations.db'}")
    db.migrate()
    gw = ChatServicer.__new__(ChatServicer)  # only the store is used by this wait
    gw.db = db
    rec = record("c1", "alice", 1)
    writer = threading.Timer(0.3, lambda: db.apply("g", "t", [domain.UpsertTurn(rec, 0, 0, 1)], {}, {}))
    try:
        writer.start()
        started = time.monotonic()
        assert asyncio.run(gw._turn_stored("c1", 1))
        assert 0.25 < time.monotonic() - started < 3
        monkeypatch.setattr(servicer_mod, "HISTORY_WAIT_S", 0.3)
        started = time.monotonic()
        assert not asyncio.run(gw._turn_stored("c1", 2))
        assert time.monotonic() - started < 2
    finally:
        writer.cancel()
        db.close()


class _Store:
    """The materializer's progress as the gateway asks for it: caught up or not (no broker here)."""

    def __init__(self, caught_up: bool | Exception) -> None:
        self.caught_up = caught_up
        self.asked: list[list[int]] = []

    def wait_caught_up(self, partitions: list[int], timeout: float) -> bool:
        self.asked.append(partitions)
        if isinstance(self.caught_up, Exception):
            raise self.caught_up
        return self.caught_up


def test_a_conversation_the_store_may_not_hold_yet_is_not_reported_missing(tmp_path: Path) -> None:
    db = ConversationDB(f"sqlite:///{tmp_path / 'conversations.db'}")
    db.migrate()
    db.apply("g", "t", [domain.UpsertTurn(record("known", "alice", 1), 0, 0, 1)], {}, {})
    gw = ChatServicer.__new__(ChatServicer)
    gw.db = db
    try:
        gw.store = _Store(caught_up=False)
        assert gw._owner("known").user_id == "alice" and not gw.store.asked  # held: nothing to wait for
        with pytest.raises(StoreBehind):  # lagging: whether it exists is not known (UNAVAILABLE, retry)
            gw._owner("unknown")
        assert len(gw.store.asked) == 1
        gw.store = _Store(caught_up=OSError("broker down"))
        with pytest.raises(StoreBehind):
            gw._owner("unknown")
        gw.store = _Store(caught_up=True)  # caught up and still unknown: it does not exist (NOT_FOUND)
        assert gw._owner("unknown") is None
    finally:
        db.close()
