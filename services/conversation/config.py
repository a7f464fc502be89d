"""Conversation store and materializer configuration (CONVERSATION_*, DATABASE_URL)."""

from __future__ import annotations

import dataclasses
import os

from services.common import topics
from services.common.config import env

DEFAULTS = {"GRPC_PORT": "50056", "METRICS_PORT": "9107"}


def _database_url(value: str) -> bool:
    """Empty, PostgreSQL, or a SQLite file (the service stops at startup on anything else)."""
    if not value:
        return True
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    from services.conversation.db import normalize_url

    try:
        url = make_url(normalize_url(value))
    except ArgumentError:
        return False
    if url.get_backend_name() == "sqlite":
        return bool(url.database) and url.database != ":memory:"
    return url.drivername == "postgresql+psycopg"


@dataclasses.dataclass(frozen=True)
class StoreConfig:
    """Where the store is and whose offsets say it is caught up: the materializer's settings,
    which the readers (gateway, prompt stage) load too so they read the same database."""

    # PostgreSQL in production (postgresql+psycopg://user:pass@host/db; postgresql:// works too).
    # Empty: the embedded SQLite file CONVERSATION_DB.
    database_url: str = env("DATABASE_URL", "", check=_database_url,
                            hint="postgresql+psycopg://user:password@host:port/database or sqlite:///path/file.db")
    db_path: str = env("CONVERSATION_DB", os.path.join(os.environ.get("COLLOQUY_VAR", "var"), "conversations.db"))
    topic: str = env("CONVERSATION_TOPIC", topics.CONVERSATION_TURNS.name)
    # Names the offsets stored in the database (and the Kafka group that splits partitions).
    group_id: str = env("CONVERSATION_GROUP_ID", "colloquy-conversation")
    busy_timeout_ms: int = env("CONVERSATION_DB_BUSY_TIMEOUT_MS", 5000, check=lambda v: 0 <= v <= 600_000,
                               hint="0..600000 milliseconds (SQLite's wait for a locked database)")
    retry_seconds: float = env("CONVERSATION_DB_RETRY_SECONDS", 1.0, check=lambda v: 0 < v <= 60,
                               hint="seconds between attempts while the database cannot be reached, 0..60")

    @property
    def url(self) -> str:
        return self.database_url or f"sqlite:///{self.db_path}"


@dataclasses.dataclass(frozen=True)
class ConversationConfig(StoreConfig):
    """The conversation service: the store, retention and a test hook."""

    # Conversations idle (no new turn) longer than this are deleted like DeleteConversation does;
    # 0 keeps them forever. Checked every CONVERSATION_RETENTION_SWEEP_SECONDS.
    retention_days: float = env("CONVERSATION_RETENTION_DAYS", 0.0, check=lambda v: v >= 0,
                                hint="days >= 0 (0 = keep forever)")
    retention_sweep_s: float = env("CONVERSATION_RETENTION_SWEEP_SECONDS", 3600.0, check=lambda v: v >= 1,
                                   hint="seconds >= 1")
    # Test hook (tests/conversation): SIGKILL this process after writing batch N's rows, before its
    # commit. 0 = off; never set it in a deployment.
    fault_kill_before_commit: int = env("CONVERSATION_FAULT_KILL_BEFORE_COMMIT", 0, check=lambda v: v >= 0,
                                        hint="a batch number >= 1, or 0 (off)")
