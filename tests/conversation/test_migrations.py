"""Versioned migrations (Alembic) on empty SQLite and PostgreSQL databases."""

from __future__ import annotations

import threading
from pathlib import Path

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from services.conversation.db import METADATA, VERSION_TABLE, ConversationDB
from tests.conversation.records import Feeder, record


def test_migrations_build_an_empty_database_and_a_second_run_changes_nothing(db_url: str) -> None:
    db = ConversationDB(db_url)
    assert db.schema_revision() is None
    assert db.migrate() == [ConversationDB.head_revision()]
    assert {"conversations", "turns", "consumer_offsets"} <= set(sa.inspect(db.engine).get_table_names())
    Feeder(db).put(record("c1", "alice", 1, "kept"))
    db.close()
    again = ConversationDB(db_url)  # a restarted service
    assert again.migrate() == []
    assert again.schema_revision() == ConversationDB.head_revision()
    page = again.get_conversation("c1", "alice")
    assert page is not None and page.turns[0].user_message == "kept"
    again.close()


def test_the_migrated_schema_is_the_schema_the_code_queries(db_url: str) -> None:
    db = ConversationDB(db_url)
    db.migrate()
    with db.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE}), METADATA)
    db.close()
    assert diff == [], f"migrations and db.py disagree: {diff}"


def test_replicas_migrating_the_same_empty_database_at_once_both_succeed(db_url: str) -> None:
    errors: list[BaseException] = []
    applied: list[list[str]] = []

    def start() -> None:
        db = ConversationDB(db_url)
        try:
            applied.append(db.migrate())
        except BaseException as exc:
            errors.append(exc)
        finally:
            db.close()

    threads = [threading.Thread(target=start) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert sorted(applied, key=len) == [[], [], [ConversationDB.head_revision()]]


def test_the_sqlite_store_is_a_wal_file_with_foreign_keys(tmp_path: Path) -> None:
    path = tmp_path / "var" / "conversations.db"
    db = ConversationDB(f"sqlite:///{path}")  # creates the missing directory
    db.migrate()
    with db.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 5000
    db.close()
    assert path.exists()


def test_a_new_sqlite_file_another_connection_holds_locked_is_opened_once_it_is_free(tmp_path: Path) -> None:
    """Turning a file into WAL needs its exclusive lock, and SQLite refuses at once (no busy
    handler) while another connection holds one: a replica starting beside one that is creating
    the file must wait for it, not fail (seen in CI: "database is locked")."""
    import sqlite3
    import time

    path = tmp_path / "conversations.db"
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("CREATE TABLE other_writer (x)")
    other.execute("BEGIN IMMEDIATE")
    other.execute("INSERT INTO other_writer VALUES (1)")
    release = threading.Timer(0.5, other.execute, args=("COMMIT",))
    release.start()
    started = time.monotonic()
    db = ConversationDB(f"sqlite:///{path}")
    try:
        assert db.migrate() == [ConversationDB.head_revision()]
    finally:
        db.close()
        release.join()
        other.close()
    assert time.monotonic() - started >= 0.4  # it waited for the other connection
