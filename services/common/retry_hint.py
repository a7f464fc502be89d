"""The `retry-after` gRPC trailer: the gateway's hint, with RESOURCE_EXHAUSTED (over a rate limit,
at capacity) or UNAVAILABLE (the store still saving the previous turn), of how many whole seconds a
client should wait before sending the same call again. Written and read here so that the gateway,
`colloquy chat` and the web front (which turns it into HTTP's Retry-After) agree on one format."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

TRAILER = "retry-after"


def seconds(wait: float) -> int:
    """Whole seconds for a retry hint (never 0: 'retry now' would just be refused again)."""
    return max(1, math.ceil(wait))


def trailer(wait: float) -> tuple[tuple[str, str]]:
    """The trailing metadata that carries the hint."""
    return ((TRAILER, str(seconds(wait))),)


def read(trailers: Iterable[tuple[str, Any]] | None) -> int | None:
    """The hint's seconds from a call's trailing metadata; None when it has none (or a malformed one)."""
    for key, value in trailers or ():
        if key != TRAILER:
            continue
        text = value.decode() if isinstance(value, bytes) else str(value)
        if text.strip().isdigit():
            return max(1, int(text))
    return None
