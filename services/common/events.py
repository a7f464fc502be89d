"""Protobuf payloads on Kafka with the standard headers (event id, request id, type, trace)."""

from __future__ import annotations

import dataclasses
import os
import uuid
from typing import TypeVar

from google.protobuf.message import DecodeError, Message

M = TypeVar("M", bound=Message)

H_EVENT_ID = "event-id"
H_REQUEST_ID = "request-id"
H_TYPE = "event-type"
H_TRACE = "traceparent"


class PoisonEvent(ValueError):
    """A record that can never be processed (undecodable, wrong type); goes to the dead-letter topic."""


@dataclasses.dataclass
class OutEvent:
    """A record to produce."""

    topic: str
    key: str
    message: Message
    request_id: str = ""
    event_id: str = ""
    traceparent: str = ""
    partition: int | None = None
    # Sent as soon as its handler returns, outside the stage's transaction (kafka_loop): only for
    # an output a redo may send again harmlessly (cumulative, idempotent: released answer text).
    at_once: bool = False

    def headers(self) -> list[tuple[str, bytes]]:
        return [
            (H_EVENT_ID, (self.event_id or str(uuid.uuid4())).encode()),
            (H_REQUEST_ID, self.request_id.encode()),
            (H_TYPE, self.message.DESCRIPTOR.full_name.encode()),
            (H_TRACE, (self.traceparent or new_traceparent()).encode()),
        ]


def new_traceparent() -> str:
    """A fresh W3C traceparent (version 00, sampled)."""
    return f"00-{os.urandom(16).hex()}-{os.urandom(8).hex()}-01"


def header(headers: list[tuple[str, bytes]] | None, name: str) -> str:
    for k, v in headers or ():
        if k == name:
            return v.decode("utf-8", "replace") if v is not None else ""
    return ""


def decode(value: bytes | None, headers: list[tuple[str, bytes]] | None, cls: type[M]) -> M:
    """Parse a record's value as `cls`; anything else is a PoisonEvent (never retried)."""
    kind = header(headers, H_TYPE)
    if kind and kind != cls.DESCRIPTOR.full_name:
        raise PoisonEvent(f"expected {cls.DESCRIPTOR.full_name}, got event-type {kind!r}")
    if value is None:
        raise PoisonEvent("empty record value (tombstone) where an event was expected")
    msg = cls()
    try:
        msg.ParseFromString(value)
    except DecodeError as exc:
        raise PoisonEvent(f"payload is not a valid {cls.DESCRIPTOR.full_name}: {exc}") from None
    return msg
