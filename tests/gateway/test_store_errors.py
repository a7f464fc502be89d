"""A database outage reaches callers as UNAVAILABLE (retry), not INTERNAL (a bug of ours)."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import sqlalchemy as sa

from services.gateway.servicer import ChatServicer


class _Aborted(Exception):
    pass


class _Context:
    """Only what ChatServicer._internal touches: abort(code, details) raises like grpc.aio's; the
    trailing metadata set before it is kept."""

    def __init__(self) -> None:
        self.code: grpc.StatusCode | None = None
        self.details = ""
        self.trailers: tuple = ()

    def set_trailing_metadata(self, trailers: tuple) -> None:
        self.trailers = trailers

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.code, self.details = code, details
        raise _Aborted


def _status(exc: Exception, ctx: _Context | None = None) -> tuple[grpc.StatusCode | None, str]:
    ctx = ctx or _Context()
    with pytest.raises(_Aborted):
        asyncio.run(ChatServicer._internal(None, ctx, exc))  # type: ignore[arg-type]
    return ctx.code, ctx.details


def test_a_real_unreachable_database_is_unavailable_with_a_retry_hint(tmp_path) -> None:
    engine = sa.create_engine(f"sqlite:///{tmp_path}/missing/dir/x.db")  # the directory does not exist
    with pytest.raises(sa.exc.OperationalError) as caught:
        engine.connect()
    ctx = _Context()
    code, details = _status(caught.value, ctx)
    assert code is grpc.StatusCode.UNAVAILABLE and "retry" in details
    assert ctx.trailers == (("retry-after", "2"),)


def test_other_errors_stay_internal() -> None:
    code, _ = _status(KeyError("bug"))
    assert code is grpc.StatusCode.INTERNAL
