"""Stage failures as a public caller sees them: the gateway's words, never the stage's internals."""

from __future__ import annotations

import grpc
from colloquy.v1 import events_pb2

from services.gateway.errors import retry_after, stage_error

INTERNAL_TEXT = "generation stream broke: RayActorError('The actor died at 10.1.2.3:6379, pid 4242')"


def err(code: str, message: str = INTERNAL_TEXT) -> events_pb2.StageError:
    return events_pb2.StageError(code=code, message=message, stage="generation")


def test_internal_stage_text_never_reaches_the_caller() -> None:
    for code in ("UNAVAILABLE", "RESOURCE_EXHAUSTED", "INTERNAL", "UNKNOWN", "DATA_LOSS", "DEADLINE_EXCEEDED",
                 "ABORTED", "NOT_FOUND", "made-up", "", "OK"):
        _status, public = stage_error(err(code), "r1")
        assert "RayActorError" not in public and "10.1.2.3" not in public, (code, public)
        assert public and public[0].islower()  # a sentence, not an exception repr


def test_codes_keep_their_meaning_and_unknown_ones_become_internal_with_the_request_id() -> None:
    assert stage_error(err("UNAVAILABLE"), "r1")[0] == grpc.StatusCode.UNAVAILABLE
    assert stage_error(err("RESOURCE_EXHAUSTED"), "r1")[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert stage_error(err("ABORTED"), "r1")[0] == grpc.StatusCode.ABORTED
    for code in ("INTERNAL", "made-up", "", "OK", "DATA_LOSS"):
        status, public = stage_error(err(code), "r1")
        assert status == grpc.StatusCode.INTERNAL and "r1" in public


def test_invalid_argument_text_is_relayed_because_it_names_the_field() -> None:
    status, public = stage_error(err("INVALID_ARGUMENT", "sampling.max_tokens: must be less than the "
                                                         "model's context\n"), "r1")
    assert status == grpc.StatusCode.INVALID_ARGUMENT
    assert public == "sampling.max_tokens: must be less than the model's context"
    assert len(stage_error(err("INVALID_ARGUMENT", "x" * 5000), "r1")[1]) <= 300


def test_only_statuses_a_plain_retry_can_cure_carry_a_retry_hint() -> None:
    assert retry_after(grpc.StatusCode.UNAVAILABLE) == 2
    assert retry_after(grpc.StatusCode.RESOURCE_EXHAUSTED) == 1
    for status in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.INTERNAL, grpc.StatusCode.NOT_FOUND,
                   grpc.StatusCode.ABORTED, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.PERMISSION_DENIED):
        assert retry_after(status) is None, status
