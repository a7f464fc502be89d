"""Test harness: one real Kafka broker for the whole session (started if none runs)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

BOOTSTRAP = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """A live broker with the product's topics; stopped at the end only if this session started it.

    Every service creates `topics.ALL` at startup; tests that run a worker without its `__main__`
    (chat.unanswered, dead-letter topics) get them here, so no test depends on an earlier one
    having started a service on the same broker (auto-create is off, as in production).
    """
    from devtools import kafka_broker
    from services.common import topics

    started = kafka_broker.ensure_broker(BOOTSTRAP)
    os.environ["KAFKA_BOOTSTRAP_SERVERS"] = BOOTSTRAP
    topics.ensure_topics(BOOTSTRAP)
    try:
        yield BOOTSTRAP
    finally:
        kafka_broker.release_broker(started, BOOTSTRAP)


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


@pytest.fixture(scope="session")
def conversation_store(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The conversation materializer (`python -m services.conversation`) on a session SQLite file,
    SERVING (caught up with conversation.turns); yields the file's path.

    The gateway and prompt processes a test starts read that file: CONVERSATION_DB and
    CONVERSATION_GROUP_ID (whose stored offsets say "caught up") are set in this process's
    environment, which they inherit, as KAFKA_BOOTSTRAP_SERVERS is."""
    import signal
    import time

    from devtools.procs import Proc, free_port
    from services.common.health_probe import serving

    path = str(tmp_path_factory.mktemp("conversation-store") / "conversations.db")
    env = {"CONVERSATION_DB": path, "CONVERSATION_GROUP_ID": f"colloquy-conversation-test-{uuid.uuid4().hex[:8]}"}
    port = free_port()
    proc = Proc("services.conversation", {**env, "GRPC_PORT": str(port), "METRICS_PORT": str(free_port()),
                                          "INSTANCE_ID": env["CONVERSATION_GROUP_ID"]})
    try:
        deadline = time.monotonic() + 180  # a fresh store replays the shared topic first
        while not serving(f"127.0.0.1:{port}"):
            assert proc.popen.poll() is None, f"the materializer exited:\n{proc.output()[-3000:]}"
            assert time.monotonic() < deadline, f"the materializer never caught up:{proc.diagnosis(3000)}"
            time.sleep(0.2)
        os.environ.update(env)
        yield path
    finally:
        for key in env:
            os.environ.pop(key, None)
        proc.signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except Exception:
            proc.kill()
