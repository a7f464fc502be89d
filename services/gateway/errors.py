"""What a public caller is told when a turn fails (no I/O).

Stages report failures with internal detail (exception reprs, Ray and engine messages) that is
for the log, not for callers. The gateway answers with its own sentence per status code; only
INVALID_ARGUMENT passes the stage's text on, because stages write it for the caller (it names
the field and the allowed range).
"""

from __future__ import annotations

import grpc
from colloquy.v1 import events_pb2

MAX_RELAYED_CHARS = 300

PUBLIC_MESSAGES = {
    grpc.StatusCode.NOT_FOUND: "conversation not found",
    grpc.StatusCode.ABORTED: "a turn is already being answered in this conversation; wait for it to finish",
    grpc.StatusCode.DEADLINE_EXCEEDED: "the answer did not finish in time",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "the model is busy with other chats right now; retry shortly",
    grpc.StatusCode.UNAVAILABLE: "the chat pipeline could not answer right now; retry shortly",
    grpc.StatusCode.CANCELLED: "the answer was cancelled",
    grpc.StatusCode.FAILED_PRECONDITION: "the message could not be answered in this conversation",
}


# The `retry-after` hint (seconds) the gateway sends with a status a plain retry can cure: a stage
# or store that is down or behind for a moment (UNAVAILABLE), a full gateway or engine
# (RESOURCE_EXHAUSTED). `colloquy chat` waits it out and retries UNAVAILABLE when nothing of the
# answer was shown yet; the web front turns it into HTTP's Retry-After.
RETRY_AFTER_S = {grpc.StatusCode.UNAVAILABLE: 2, grpc.StatusCode.RESOURCE_EXHAUSTED: 1}


def retry_after(status: grpc.StatusCode) -> int | None:
    """The hint for a call ending with `status`; None when retrying the same call cannot help."""
    return RETRY_AFTER_S.get(status)


def internal_error(request_id: str) -> str:
    """The sentence for a failure the caller cannot act on except by retrying or reporting it."""
    ref = f" (request id {request_id})" if request_id else ""
    return f"the answer failed because of an internal error{ref}; retry, and report the id if it keeps happening"


def stage_error(error: events_pb2.StageError, request_id: str) -> tuple[grpc.StatusCode, str]:
    """The status and public message for a stage's StageError (its own message goes to the log)."""
    status = getattr(grpc.StatusCode, error.code, None) if error.code.isupper() else None
    if not isinstance(status, grpc.StatusCode) or status is grpc.StatusCode.OK:
        return grpc.StatusCode.INTERNAL, internal_error(request_id)
    if status is grpc.StatusCode.INVALID_ARGUMENT:
        text = " ".join(error.message.split())[:MAX_RELAYED_CHARS]
        return status, text or "the message could not be answered as sent"
    public = PUBLIC_MESSAGES.get(status)
    if public is None:  # INTERNAL, UNKNOWN, DATA_LOSS, ...: nothing the caller should read
        return grpc.StatusCode.INTERNAL, internal_error(request_id)
    return status, public
