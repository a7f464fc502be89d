"""Test harness: one real Kafka broker for the whole session (started if none runs)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

BOOTSTRAP = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """A live broker; stopped at the end only if this session started it."""
    from devtools import kafka_broker

    started = kafka_broker.ensure_broker(BOOTSTRAP)
    os.environ["KAFKA_BOOTSTRAP_SERVERS"] = BOOTSTRAP
    try:
        yield BOOTSTRAP
    finally:
        if started and not os.environ.get("COLLOQUY_KEEP_KAFKA"):
            kafka_broker.stop_broker()


@pytest.fixture
def unique() -> str:
    """A short unique suffix so tests never share topics or consumer groups."""
    return uuid.uuid4().hex[:10]


@pytest.fixture(scope="session")
def tokenizer_path():  # type: ignore[no-untyped-def]
    """The served model's tokenizer directory (shared by the tokenizer and prompt suites)."""
    from tests.tokenizer.files import tokenizer_dir

    return tokenizer_dir()


@pytest.fixture(scope="session")
def tok(tokenizer_path):  # type: ignore[no-untyped-def]
    from services.tokenizer.domain import TextTokenizer

    return TextTokenizer.from_file(str(tokenizer_path / "tokenizer.json"))


_exit_status = 0


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    global _exit_status
    _exit_status = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """End the process with pytest's own verdict once every report is written.

    In-process tests leave the threads of grpc, Ray clients, ONNX Runtime and kafka-python
    behind; tearing the interpreter down under them crashed it once (SIGSEGV after the summary,
    every test having run), which turned a finished run's verdict into exit 139. The verdict is
    known here, so finalization has nothing left to add.
    """
    import sys

    if os.environ.get("COLLOQUY_PYTEST_HARD_EXIT", "1") == "1":
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_exit_status)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that takes the broker or the stack carries its marker even if its module forgot it,
    so `make check` (-m "not kafka and not model and not pipeline") never needs either."""
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if "kafka_bootstrap" in names:
            item.add_marker(pytest.mark.kafka)
        if "stack" in names:
            item.add_marker(pytest.mark.pipeline)
