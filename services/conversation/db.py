"""The conversation store: a relational materialized view of `conversation.turns`.

SQLite (a file, WAL mode) by default, PostgreSQL in production; SQLAlchemy Core, so both run the
same statements. The Kafka topic stays the source of truth: the materializer writes turns with
the consumed offsets in the same transaction (`apply`), so the store can always be rebuilt by
replaying the topic, and a crash never leaves rows without their offsets or offsets without rows.

Schema changes are Alembic migrations (services/conversation/migrations), run by `migrate()`;
the tables below must match them (a test compares the two).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import sqlalchemy as sa
from colloquy.v1 import chat_pb2
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from services.conversation import domain

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
VERSION_TABLE = "conversation_schema_version"
# pg_advisory_xact_lock key: two replicas starting at once migrate one after the other.
_MIGRATION_LOCK = 0x636F6E76  # "conv"

METADATA = sa.MetaData()

conversations = sa.Table(
    "conversations", METADATA,
    sa.Column("id", sa.String(128), primary_key=True),
    sa.Column("user_id", sa.String(256), nullable=False),
    # The first message on one line (domain.title_of); emptied when the conversation is deleted.
    sa.Column("title", sa.Text, nullable=False),
    sa.Column("created_ms", sa.BigInteger, nullable=False),
    sa.Column("last_activity_ms", sa.BigInteger, nullable=False),
    # Set when the conversation was deleted (its turns are gone); later records for it are ignored,
    # so a turn that raced the deletion cannot bring it back. Null while it lives.
    sa.Column("deleted_ms", sa.BigInteger, nullable=True),
    sa.Index("ix_conversations_user_activity", "user_id", "last_activity_ms", "id"),
)

turns = sa.Table(
    "turns", METADATA,
    sa.Column("conversation_id", sa.String(128), sa.ForeignKey("conversations.id", ondelete="CASCADE"),
              primary_key=True),
    sa.Column("turn_index", sa.Integer, primary_key=True),
    sa.Column("user_message", sa.Text, nullable=False),
    # The visible turn (colloquy.v1.Turn) exactly as recorded: answers, versions, flags.
    sa.Column("turn", sa.LargeBinary, nullable=False),
    # The prompt the model saw (hidden instructions included): for feedback, never shown.
    sa.Column("prompt", sa.Text, nullable=False),
    sa.Column("request_id", sa.String(128), nullable=False),
    sa.Column("created_ms", sa.BigInteger, nullable=False),
    # Where the record came from on conversation.turns (for debugging and audits).
    sa.Column("source_partition", sa.Integer, nullable=False),
    sa.Column("source_offset", sa.BigInteger, nullable=False),
)

consumer_offsets = sa.Table(
    "consumer_offsets", METADATA,
    sa.Column("group_id", sa.String(256), primary_key=True),
    sa.Column("topic", sa.String(256), primary_key=True),
    sa.Column("kafka_partition", sa.Integer, primary_key=True),
    # The next offset to read: everything before it is applied in this database.
    sa.Column("next_offset", sa.BigInteger, nullable=False),
    sa.Column("updated_ms", sa.BigInteger, nullable=False),
)


class OffsetsMoved(RuntimeError):
    """Another writer advanced a partition's stored offset since we read it (a rebalance race):
    the batch was rolled back and must be re-read from the stored offsets."""


@dataclasses.dataclass(frozen=True)
class TurnPage:
    turns: list[chat_pb2.Turn]
    next_page_token: str  # empty on the last page


@dataclasses.dataclass(frozen=True)
class ConversationSummary:
    conversation_id: str
    title: str
    created_ms: int
    last_activity_ms: int


@dataclasses.dataclass(frozen=True)
class ConversationPage:
    conversations: list[ConversationSummary]
    next_page_token: str  # empty on the last page


@dataclasses.dataclass(frozen=True)
class History:
    """A conversation's owner and turns in order, for prompt assembly (no owner check here: the
    caller compares `user_id`). `deleted`: the conversation was deleted; it has no turns."""

    user_id: str
    deleted: bool
    turns: list[chat_pb2.Turn]


@dataclasses.dataclass(frozen=True)
class Owner:
    """Who a conversation belongs to, and whether it was deleted."""

    user_id: str
    deleted: bool


@dataclasses.dataclass(frozen=True)
class StoredTurn:
    turn: chat_pb2.Turn
    prompt: str


def normalize_url(url: str) -> str:
    """`postgres://` and `postgresql://` (what a Secret usually holds) use psycopg 3."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def make_engine(url: str, busy_timeout_ms: int = 5000) -> Engine:
    """An engine for `url`; SQLite gets WAL, a busy timeout, foreign keys and real transactions."""
    url = normalize_url(url)
    parsed = sa.make_url(url)
    if parsed.get_backend_name() != "sqlite":
        # A database that does not answer fails a connection in 5 s instead of hanging the worker.
        return sa.create_engine(url, pool_pre_ping=True, connect_args={"connect_timeout": 5})
    if not parsed.database or parsed.database == ":memory:":
        raise ValueError("the SQLite store needs a file (sqlite:///path/to/conversations.db)")
    Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(url, connect_args={"timeout": busy_timeout_ms / 1000})

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
        # pysqlite's own transaction handling defers BEGIN and cannot take the write lock up
        # front; turn it off and begin ourselves (SQLAlchemy's documented recipe).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        _wal(cur, busy_timeout_ms)
        cur.execute("PRAGMA foreign_keys=ON")
        # WAL + NORMAL: a crashed process loses nothing; a power cut may lose the last commits,
        # rows and offsets together, which a replay from the stored offsets redoes.
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # Writers take the lock at BEGIN: a deferred transaction that later writes can fail with
        # SQLITE_BUSY without waiting for the busy timeout.
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("colloquy_write") else "BEGIN")

    return engine


def _wal(cur: sqlite3.Cursor, busy_timeout_ms: int) -> None:
    """`PRAGMA journal_mode=WAL`, tried again within the busy timeout: turning a new file into WAL
    takes its exclusive lock, and SQLite answers "database is locked" at once, without the busy
    handler, while another connection holds a lock (replicas starting together on an empty
    file: 1 run in 40 of three threads here, and one CI run)."""
    deadline = time.monotonic() + busy_timeout_ms / 1000
    while True:
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(0.05)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _turn(raw: bytes) -> chat_pb2.Turn:
    return chat_pb2.Turn.FromString(raw)


class ConversationDB:
    """The store: the materializer's writes (`apply`) and the readers' queries."""

    def __init__(self, url: str, busy_timeout_ms: int = 5000) -> None:
        self.url = normalize_url(url)
        self.engine = make_engine(self.url, busy_timeout_ms)
        self.dialect = self.engine.dialect.name

    def close(self) -> None:
        self.engine.dispose()

    @contextlib.contextmanager
    def _write(self) -> Iterator[Connection]:
        with self.engine.connect() as conn:
            conn.execution_options(colloquy_write=True)
            with conn.begin():
                yield conn

    # -- schema ---------------------------------------------------------------------------------
    def migrate(self) -> list[str]:
        """Bring the schema to the newest migration; returns the revisions it applied (none when
        the database is up to date). Replicas starting together take turns (a lock)."""
        from alembic import command
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        with self._write() as conn:
            if self.dialect == "postgresql":
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK})
            before = self._revision(conn)
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
            after = self._revision(conn)
        return [] if before == after else self._revisions_between(cfg, before, after)

    def schema_revision(self) -> str | None:
        """The migration the database is at (None: empty database)."""
        with self.engine.connect() as conn:
            return self._revision(conn)

    @staticmethod
    def head_revision() -> str:
        from alembic.config import Config
        from alembic.script import ScriptDirectory

        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        head = ScriptDirectory.from_config(cfg).get_current_head()
        assert head is not None
        return head

    @staticmethod
    def _revision(conn: Connection) -> str | None:
        from alembic.runtime.migration import MigrationContext

        return MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE}).get_current_revision()

    @staticmethod
    def _revisions_between(cfg, before: str | None, after: str | None) -> list[str]:  # type: ignore[no-untyped-def]
        from alembic.script import ScriptDirectory

        script = ScriptDirectory.from_config(cfg)
        return [r.revision for r in reversed(list(script.walk_revisions(base=before or "base", head=after or "heads")))]

    def ping(self) -> None:
        """Raises when the database cannot be reached."""
        with self.engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))

    # -- the materializer's side ----------------------------------------------------------------
    def stored_offsets(self, group_id: str, topic: str) -> dict[int, int]:
        """partition -> next offset to read, as committed with the rows."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(consumer_offsets.c.kafka_partition, consumer_offsets.c.next_offset)
                                .where(consumer_offsets.c.group_id == group_id, consumer_offsets.c.topic == topic))
            return {int(p): int(o) for p, o in rows}

    def apply(self, group_id: str, topic: str, changes: Sequence[domain.Change],
              expected: dict[int, int | None], new: dict[int, int],
              before_commit: Callable[[], None] | None = None) -> Counter[str]:
        """Apply `changes` and move each partition's stored offset from `expected` to `new`, in one
        transaction. Raises OffsetsMoved (nothing applied) when a stored offset is not the
        expected one any more. Returns what happened, counted by outcome."""
        outcome: Counter[str] = Counter()
        with self._write() as conn:
            run: list[domain.UpsertTurn] = []  # consecutive upserts are written together
            for change in changes:
                if isinstance(change, domain.UpsertTurn):
                    run.append(change)
                elif isinstance(change, domain.DeleteTurn):
                    outcome += self._upsert_run(conn, run)
                    run = []
                    outcome[self._delete_turn(conn, change)] += 1
            outcome += self._upsert_run(conn, run)
            for partition, offset in sorted(new.items()):
                self._advance(conn, group_id, topic, partition, expected.get(partition), offset)
            if before_commit is not None:
                before_commit()
        return outcome

    def _advance(self, conn: Connection, group_id: str, topic: str, partition: int,
                 expected: int | None, offset: int) -> None:
        t = consumer_offsets
        if expected is None:
            try:
                conn.execute(sa.insert(t).values(group_id=group_id, topic=topic, kafka_partition=partition,
                                                 next_offset=offset, updated_ms=_now_ms()))
            except sa.exc.IntegrityError:
                raise OffsetsMoved(f"partition {partition}: offsets were stored by another writer") from None
            return
        res = conn.execute(sa.update(t).where(t.c.group_id == group_id, t.c.topic == topic,
                                              t.c.kafka_partition == partition, t.c.next_offset == expected)
                           .values(next_offset=offset, updated_ms=_now_ms()))
        if res.rowcount != 1:
            raise OffsetsMoved(f"partition {partition}: the stored offset is no longer {expected}")

    def _insert(self):  # type: ignore[no-untyped-def]
        return postgresql.insert if self.dialect == "postgresql" else sqlite.insert

    def _upsert_run(self, conn: Connection, run: list[domain.UpsertTurn]) -> Counter[str]:
        """Write consecutive upserts with a few statements, with the outcome applying them one by
        one would have: the first record creates a conversation and names its owner, a record for
        another owner or a deleted conversation is ignored, the lowest turn index gives the title,
        and a later record for the same turn wins."""
        outcome: Counter[str] = Counter()
        if not run:
            return outcome
        c = conversations
        ids = sorted({ch.record.conversation_id for ch in run})
        known = {r.id: (r.user_id, r.deleted_ms is not None)
                 for r in conn.execute(sa.select(c.c.id, c.c.user_id, c.c.deleted_ms).where(c.c.id.in_(ids)))}
        firsts = {r[0]: r[1] for r in conn.execute(
            sa.select(turns.c.conversation_id, sa.func.min(turns.c.turn_index))
            .where(turns.c.conversation_id.in_(ids)).group_by(turns.c.conversation_id))}
        owners = dict(known)
        spans: dict[str, list] = {}  # conversation -> [created, last activity, (lowest index, its message)]
        rows: dict[tuple[str, int], dict] = {}
        for ch in run:
            rec, cid = ch.record, ch.record.conversation_id
            owner = owners.setdefault(cid, (rec.user_id, False))
            if owner[0] != rec.user_id:
                outcome["ignored_other_owner"] += 1  # a record never moves a conversation to another owner
                continue
            if owner[1]:
                outcome["ignored_deleted"] += 1
                continue
            span = spans.setdefault(cid, [ch.created_ms, ch.created_ms, (rec.turn.index, rec.turn.user_message)])
            span[0], span[1] = min(span[0], ch.created_ms), max(span[1], ch.created_ms)
            if rec.turn.index <= span[2][0]:
                span[2] = (rec.turn.index, rec.turn.user_message)
            rows[(cid, rec.turn.index)] = {
                "conversation_id": cid, "turn_index": rec.turn.index, "user_message": rec.turn.user_message,
                "turn": rec.turn.SerializeToString(), "prompt": rec.prompt, "request_id": rec.turn.request_id,
                "created_ms": ch.created_ms, "source_partition": ch.partition, "source_offset": ch.offset,
            }
            outcome["written"] += 1
        fresh = [{"id": cid, "user_id": owners[cid][0], "title": domain.title_of(span[2][1]), "created_ms": span[0],
                  "last_activity_ms": span[1]} for cid, span in spans.items() if cid not in known]
        if fresh:
            conn.execute(sa.insert(c), fresh)
        retitled, same_title = [], []
        for cid, span in spans.items():
            if cid in known:
                first = firsts.get(cid)
                params = {"b_id": cid, "b_created": span[0], "b_last": span[1], "b_title": domain.title_of(span[2][1])}
                (retitled if first is None or span[2][0] <= first else same_title).append(params)
        times = {
            "last_activity_ms": sa.case((c.c.last_activity_ms < sa.bindparam("b_last"), sa.bindparam("b_last")),
                                        else_=c.c.last_activity_ms),
            "created_ms": sa.case((c.c.created_ms > sa.bindparam("b_created"), sa.bindparam("b_created")),
                                  else_=c.c.created_ms),
        }
        if retitled:
            conn.execute(sa.update(c).where(c.c.id == sa.bindparam("b_id"))
                         .values(**times, title=sa.bindparam("b_title")), retitled)
        if same_title:
            conn.execute(sa.update(c).where(c.c.id == sa.bindparam("b_id")).values(**times),
                         [{k: v for k, v in p.items() if k != "b_title"} for p in same_title])
        if rows:
            stmt = self._insert()(turns)
            stmt = stmt.on_conflict_do_update(
                index_elements=[turns.c.conversation_id, turns.c.turn_index],
                set_={col.name: stmt.excluded[col.name] for col in turns.columns
                      if col.name not in ("conversation_id", "turn_index")})
            conn.execute(stmt, list(rows.values()))
        return outcome

    def _delete_turn(self, conn: Connection, change: domain.DeleteTurn) -> str:
        gone = conn.execute(sa.delete(turns).where(turns.c.conversation_id == change.conversation_id,
                                                   turns.c.turn_index == change.turn_index)).rowcount
        if not gone:
            return "tombstone_noop"
        first = conn.execute(sa.select(turns.c.turn_index, turns.c.user_message)
                             .where(turns.c.conversation_id == change.conversation_id)
                             .order_by(turns.c.turn_index).limit(1)).first()
        c = conversations
        if first is None:  # its last turn: the conversation is gone
            conn.execute(sa.update(c).where(c.c.id == change.conversation_id)
                         .values(deleted_ms=_now_ms(), title=""))
            return "deleted_conversation"
        if change.turn_index < first.turn_index:
            conn.execute(sa.update(c).where(c.c.id == change.conversation_id)
                         .values(title=domain.title_of(first.user_message)))
        return "deleted_turn"

    # -- readers --------------------------------------------------------------------------------
    @staticmethod
    def _owned(conversation_id: str, user_id: str):  # type: ignore[no-untyped-def]
        c = conversations
        return sa.select(c.c.id).where(c.c.id == conversation_id, c.c.user_id == user_id, c.c.deleted_ms.is_(None))

    def get_conversation(self, conversation_id: str, user_id: str, page_size: int = 0,
                         page_token: str = "") -> TurnPage | None:
        """One page of the caller's conversation, oldest turn first; None when it does not exist,
        is deleted or is someone else's (the caller answers NOT_FOUND either way).

        Raises ValueError for a negative page size, domain.InvalidPageToken for a bad token."""
        size = domain.page_size(page_size)
        after = 0
        if page_token:
            conv, after = domain.decode_token(page_token, "turns", (str, int))
            if conv != conversation_id:
                raise domain.InvalidPageToken("page_token belongs to another conversation")
        with self.engine.connect() as conn:
            if conn.execute(self._owned(conversation_id, user_id)).first() is None:
                return None
            rows = conn.execute(sa.select(turns.c.turn_index, turns.c.turn)
                                .where(turns.c.conversation_id == conversation_id, turns.c.turn_index > after)
                                .order_by(turns.c.turn_index).limit(size + 1)).all()
        token = domain.encode_token("turns", conversation_id, rows[size - 1].turn_index) if len(rows) > size else ""
        return TurnPage([_turn(r.turn) for r in rows[:size]], token)

    def list_conversations(self, user_id: str, page_size: int = 0, page_token: str = "") -> ConversationPage:
        """The caller's conversations, most recent activity first (ties: by id), deleted ones left
        out. The token is a keyset cursor: a conversation that gets a new turn while the caller
        pages moves to the front and is not repeated on a later page."""
        size = domain.page_size(page_size)
        c = conversations
        q = sa.select(c.c.id, c.c.title, c.c.created_ms, c.c.last_activity_ms).where(
            c.c.user_id == user_id, c.c.deleted_ms.is_(None))
        if page_token:
            last_ms, last_id = domain.decode_token(page_token, "conversations", (int, str))
            q = q.where(sa.tuple_(c.c.last_activity_ms, c.c.id) < sa.tuple_(sa.literal(last_ms), sa.literal(last_id)))
        q = q.order_by(c.c.last_activity_ms.desc(), c.c.id.desc()).limit(size + 1)
        with self.engine.connect() as conn:
            rows = conn.execute(q).all()
        token = ""
        if len(rows) > size:
            token = domain.encode_token("conversations", rows[size - 1].last_activity_ms, rows[size - 1].id)
        return ConversationPage([ConversationSummary(r.id, r.title, r.created_ms, r.last_activity_ms)
                                 for r in rows[:size]], token)

    def history(self, conversation_id: str) -> History | None:
        """Owner and every turn in order (None: no such conversation). For prompt assembly."""
        c = conversations
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(c.c.user_id, c.c.deleted_ms).where(c.c.id == conversation_id)).first()
            if row is None:
                return None
            rows = conn.execute(sa.select(turns.c.turn).where(turns.c.conversation_id == conversation_id)
                                .order_by(turns.c.turn_index)).all()
        return History(row.user_id, row.deleted_ms is not None, [_turn(r.turn) for r in rows])

    def owner(self, conversation_id: str) -> Owner | None:
        """The conversation's owner (None: never recorded). For "someone else's or deleted"
        checks that must not load its turns."""
        c = conversations
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(c.c.user_id, c.c.deleted_ms).where(c.c.id == conversation_id)).first()
        return None if row is None else Owner(row.user_id, row.deleted_ms is not None)

    def turn_indexes(self, conversation_id: str, user_id: str) -> list[int] | None:
        """The turn indexes of the caller's conversation (None: not the caller's, or deleted):
        the keys a deletion writes tombstones for."""
        with self.engine.connect() as conn:
            if conn.execute(self._owned(conversation_id, user_id)).first() is None:
                return None
            return [int(r[0]) for r in conn.execute(sa.select(turns.c.turn_index).where(
                turns.c.conversation_id == conversation_id).order_by(turns.c.turn_index))]

    def idle_conversations(self, before_ms: int, limit: int = 500) -> list[tuple[str, str]]:
        """(conversation, owner) of live conversations whose last activity is before `before_ms`,
        oldest first, at most `limit`: what the retention sweep deletes."""
        c = conversations
        q = (sa.select(c.c.id, c.c.user_id).where(c.c.deleted_ms.is_(None), c.c.last_activity_ms < before_ms)
             .order_by(c.c.last_activity_ms, c.c.id).limit(limit))
        with self.engine.connect() as conn:
            return [(r.id, r.user_id) for r in conn.execute(q)]

    def turn_recorded(self, conversation_id: str, index: int) -> bool:
        """Whether turn `index` is in the store (read-your-writes waits poll this)."""
        with self.engine.connect() as conn:
            return conn.execute(sa.select(turns.c.turn_index).where(
                turns.c.conversation_id == conversation_id, turns.c.turn_index == index)).first() is not None

    def get_turn(self, conversation_id: str, user_id: str, index: int) -> StoredTurn | None:
        """One turn of the caller's conversation with the prompt the model saw (for feedback)."""
        with self.engine.connect() as conn:
            if conn.execute(self._owned(conversation_id, user_id)).first() is None:
                return None
            row = conn.execute(sa.select(turns.c.turn, turns.c.prompt).where(
                turns.c.conversation_id == conversation_id, turns.c.turn_index == index)).first()
        return None if row is None else StoredTurn(_turn(row.turn), row.prompt)

    def turn_by_request(self, conversation_id: str, user_id: str, request_id: str) -> chat_pb2.Turn | None:
        """The caller's turn made by Chat call `request_id` (idempotent retries look it up)."""
        with self.engine.connect() as conn:
            if conn.execute(self._owned(conversation_id, user_id)).first() is None:
                return None
            row = conn.execute(sa.select(turns.c.turn).where(
                turns.c.conversation_id == conversation_id, turns.c.request_id == request_id)
                .order_by(turns.c.turn_index).limit(1)).first()
        return None if row is None else _turn(row.turn)

    def delete_conversation(self, conversation_id: str, user_id: str) -> bool:
        """Remove the caller's conversation from the store: its turns are deleted and it is marked
        deleted (so a late record for it is ignored). False when it is not the caller's or is
        already deleted. The topic's tombstones are the caller's job (this is only the view)."""
        c = conversations
        with self._write() as conn:
            if conn.execute(self._owned(conversation_id, user_id)).first() is None:
                return False
            conn.execute(sa.delete(turns).where(turns.c.conversation_id == conversation_id))
            conn.execute(sa.update(c).where(c.c.id == conversation_id).values(deleted_ms=_now_ms(), title=""))
        return True
