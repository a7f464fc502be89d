"""Reading generation's progress topic from a test: the final record of one request."""

from __future__ import annotations

import time

from colloquy.v1 import events_pb2

from services.common import events
from tests.common.kafka_util import Tail

RESCAN_S = 20.0  # read the topic again from the start positions after this long without the record


def final_progress(progress: Tail, request_id: str, timeout: float = 150.0) -> events_pb2.GenerationProgress | None:
    """The `done` GenerationProgress of `request_id` (None if none came within `timeout`); closes `progress`."""
    deadline = time.monotonic() + timeout
    rescan_at = time.monotonic() + RESCAN_S
    try:
        while time.monotonic() < deadline:
            for records in progress.consumer.poll(timeout_ms=500).values():
                for r in records:
                    p = events.decode(r.value, r.headers, events_pb2.GenerationProgress)
                    if p.turn.request_id == request_id and p.done:
                        return p
            if time.monotonic() > rescan_at:  # a lost fetch would hide the record for good
                progress.rescan()
                rescan_at = time.monotonic() + RESCAN_S
    finally:
        progress.close()
    return None
