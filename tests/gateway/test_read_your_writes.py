"""The gateway's wait before `done` (read-your-writes) over a real SQLite store, no broker: it
returns once the turn is stored (written here by another thread, as the materializer would) and
gives up after its bound."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

from services.conversation import domain
from services.conversation.db import ConversationDB
from services.gateway import servicer as servicer_mod
from services.gateway.servicer import ChatServicer
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
