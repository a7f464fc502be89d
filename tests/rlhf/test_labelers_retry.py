"""rlhf.labelers: a call the gateway's rate limit refused is repeated after the wait it names; an
argument the gateway refuses ends the run with its message."""

from __future__ import annotations

import grpc
import pytest

from rlhf import labelers
from rlhf.labelers import SimulatedLabeler, retry_delay


class Refused(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, trailers: tuple = ()) -> None:
        self._code, self._trailers = code, trailers

    def code(self) -> grpc.StatusCode:
        return self._code

    def trailing_metadata(self) -> tuple:
        return self._trailers


def test_retry_delay_follows_the_retry_after_trailer() -> None:
    assert retry_delay(Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, (("retry-after", "1"),)), 0) == pytest.approx(1.1)
    assert retry_delay(Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, (("retry-after", "x"),)), 2) == 6.0
    assert retry_delay(Refused(grpc.StatusCode.UNAVAILABLE), 9) == 10.0


def test_a_refused_submit_is_repeated_and_other_errors_are_not(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("rlhf.labelers.time.sleep", lambda s: None)
    labeler = SimulatedLabeler("127.0.0.1:1", key="k", retries=3)
    try:
        calls: list[object] = []

        def twice_refused(request: object, metadata: object, timeout: float) -> str:
            calls.append(metadata)
            if len(calls) < 3:
                raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, (("retry-after", "0"),))
            return "recorded"

        assert labeler._unary(twice_refused, object(), feedback=True) == "recorded" and len(calls) == 3

        def unavailable(request: object, metadata: object, timeout: float) -> str:
            calls.append(metadata)
            raise Refused(grpc.StatusCode.UNAVAILABLE)

        calls.clear()
        with pytest.raises(grpc.RpcError):  # a write may have landed: not repeated
            labeler._unary(unavailable, object(), feedback=True)
        assert len(calls) == 1
        calls.clear()
        with pytest.raises(grpc.RpcError):  # a read is repeated, up to the retries
            labeler._unary(unavailable, object(), read_only=True)
        assert len(calls) == 4
    finally:
        labeler.close()


class Invalid(Refused):
    def details(self) -> str:
        return "sampling.n: 6 is outside [1, 4]"


def test_a_refused_argument_ends_the_labellers_with_the_gateways_message(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def refused(*args: object) -> None:
        raise Invalid(grpc.StatusCode.INVALID_ARGUMENT)

    monkeypatch.setattr("rlhf.labelers.run", refused)
    assert labelers.main(["--target", "127.0.0.1:1", "--version", "", "--n", "6", "--seed", "0"]) == 2
    assert "the gateway refused the labellers' request: sampling.n: 6 is outside [1, 4]" in capsys.readouterr().err

    def unavailable(*args: object) -> None:
        raise Refused(grpc.StatusCode.UNAVAILABLE)

    monkeypatch.setattr("rlhf.labelers.run", unavailable)
    with pytest.raises(grpc.RpcError):  # anything else is not the labellers' arguments: not hidden
        labelers.main(["--target", "127.0.0.1:1", "--version", "", "--seed", "0"])
