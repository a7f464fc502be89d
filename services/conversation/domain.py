"""What a `conversation.turns` record means for the store: plain data, no I/O.

The materializer turns each Kafka record into one `Change`: an upsert of a turn, the deletion of
a turn (a tombstone: null value on the compacted topic), or a poison record for the dead-letter
topic. Page tokens and titles live here too, so the SQL layer only runs queries.
"""

from __future__ import annotations

import base64
import dataclasses
import json

from colloquy.v1 import events_pb2

from services.common import events
from services.common.turns import history_key

TITLE_CHARS = 80
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000


@dataclasses.dataclass(frozen=True)
class UpsertTurn:
    """A finished turn to write (or to replace: a later record for the same key wins)."""

    record: events_pb2.TurnRecord
    partition: int
    offset: int
    # When the turn finished, in ms: the turn's own created_at, else the Kafka record's timestamp.
    created_ms: int


@dataclasses.dataclass(frozen=True)
class DeleteTurn:
    """A tombstone for `<conversation>/<turn>`: the turn is removed from the store."""

    conversation_id: str
    turn_index: int
    partition: int
    offset: int


@dataclasses.dataclass(frozen=True)
class Poison:
    """A record that can never be applied; the worker dead-letters it."""

    reason: str


Change = UpsertTurn | DeleteTurn | Poison


def parse_key(key: bytes | None) -> tuple[str, int]:
    """`<conversation>/<turn>` -> (conversation, turn); ValueError when it is not such a key."""
    if not key:
        raise ValueError("no key")
    text = key.decode("utf-8")
    conv, sep, index = text.rpartition("/")
    if not sep or not conv or not index.isdigit() or int(index) < 1:
        raise ValueError(f"key {text[:100]!r} is not <conversation>/<turn index>")
    return conv, int(index)


def change_for(key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]] | None,
               partition: int, offset: int, timestamp_ms: int) -> Change:
    """Classify one consumed record. Never raises: a bad record becomes Poison."""
    if value is None:
        try:
            conv, index = parse_key(key)
        except (ValueError, UnicodeDecodeError) as exc:
            return Poison(f"tombstone with an unusable key: {exc}")
        return DeleteTurn(conv, index, partition, offset)
    try:
        record = events.decode(value, headers, events_pb2.TurnRecord)
    except events.PoisonEvent as exc:
        return Poison(str(exc))
    if not record.conversation_id or not record.user_id or record.turn.index < 1:
        return Poison("TurnRecord without conversation_id, user_id or a turn index >= 1")
    expected = history_key(record.conversation_id, record.turn.index)
    got = key.decode("utf-8", "replace") if key else ""
    if got != expected:
        # A tombstone for the right key would never delete this row: refuse it instead.
        return Poison(f"key {got[:100]!r} does not match the record's {expected[:100]!r}")
    created = record.turn.created_at
    created_ms = created.seconds * 1000 + created.nanos // 1_000_000 if created.seconds else timestamp_ms
    return UpsertTurn(record, partition, offset, created_ms)


def title_of(message: str) -> str:
    """A conversation's title: its first message on one line, at most TITLE_CHARS characters."""
    line = " ".join(message.split())
    return line if len(line) <= TITLE_CHARS else line[: TITLE_CHARS - 1].rstrip() + "…"


class InvalidPageToken(ValueError):
    """A page token this store did not hand out (or for another listing); INVALID_ARGUMENT."""


def page_size(requested: int) -> int:
    """0 means the default; negative is refused; above the maximum is clamped."""
    if requested < 0:
        raise ValueError("page_size must be >= 0")
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def encode_token(kind: str, *fields: object) -> str:
    """An opaque keyset cursor: where the next page starts, not an offset (stable under inserts)."""
    raw = json.dumps([1, kind, *fields], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_token(token: str, kind: str, types: tuple[type, ...]) -> list:
    """The fields of a token made by `encode_token(kind, ...)`; InvalidPageToken otherwise."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidPageToken("page_token is not a token this service returned") from exc
    if (not isinstance(doc, list) or len(doc) != 2 + len(types) or doc[0] != 1 or doc[1] != kind
            or not all(type(v) is t for v, t in zip(doc[2:], types, strict=True))):
        raise InvalidPageToken("page_token is not a token this service returned for this listing")
    return doc[2:]
