"""The conversation store's harness: a real PostgreSQL (scripts/postgres.sh) next to SQLite files.

`db_url` is parametrized over both databases, each test getting an empty one: a fresh SQLite
file, or a fresh PostgreSQL database dropped afterwards. The PostgreSQL server is started when
none answers and stopped at the end only if this session started it (like Kafka's fixture).
"""

from __future__ import annotations

import os
import socket
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PG_SH = REPO / "scripts" / "postgres.sh"


def _pg(*args: str, port: int | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, POSTGRES_PORT=str(port)) if port else None
    return subprocess.run(["bash", str(PG_SH), *args], capture_output=True, text=True, timeout=180, env=env)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """URL of the server's `postgres` database (the admin connection).

    When the server will not start on its usual port (taken by another program on a shared
    machine), the same cluster is started once more on a free port, and both failures are shown
    if that fails too.
    """
    port: int | None = None
    started = False
    if _pg("status").returncode != 0:
        res = _pg("up")
        if res.returncode != 0:
            port = _free_port()
            retry = _pg("up", port=port)
            assert retry.returncode == 0, (
                f"scripts/postgres.sh up failed:\n{res.stdout}\n{res.stderr}\n"
                f"and again with POSTGRES_PORT={port}:\n{retry.stdout}\n{retry.stderr}")
        started = True
    url = _pg("url", port=port).stdout.strip()
    try:
        yield url
    finally:
        if started and not os.environ.get("COLLOQUY_KEEP_POSTGRES"):
            _pg("down", port=port)


@pytest.fixture(scope="session")
def new_pg_database(postgres_server: str) -> Iterator[Callable[[], str]]:
    """A factory of fresh, empty PostgreSQL databases (all dropped at the end of the session)."""
    import psycopg

    admin_url = postgres_server.replace("postgresql+psycopg://", "postgresql://")
    made: list[str] = []

    def make() -> str:
        name = f"colloquy_test_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        made.append(name)
        return postgres_server.rsplit("/", 1)[0] + "/" + name

    yield make
    with psycopg.connect(admin_url, autocommit=True) as conn:
        for name in made:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database of each kind: the same test runs against SQLite and PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'conversations.db'}"
    return request.getfixturevalue("new_pg_database")()


@pytest.fixture
def store(db_url: str) -> Iterator:
    """A migrated ConversationDB on an empty database of each kind."""
    from services.conversation.db import ConversationDB

    db = ConversationDB(db_url)
    db.migrate()
    yield db
    db.close()
