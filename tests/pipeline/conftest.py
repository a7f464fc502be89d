"""One running stack for every module of tests/pipeline (starting it costs a few minutes on 2 cores)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.stack import Stack


@pytest.fixture(scope="package")  # stopped after tests/pipeline, before other suites start Ray
def stack(kafka_bootstrap: str) -> Iterator[Stack]:
    # The conversation store: a SQLite file of the stack's own, or the PostgreSQL database
    # COLLOQUY_STACK_DATABASE_URL names (e.g. one made on `scripts/postgres.sh url`'s server).
    s = Stack(kafka_bootstrap, database_url=os.environ.get("COLLOQUY_STACK_DATABASE_URL", "")).start()
    try:
        yield s
    finally:
        s.stop()


# Modules that change the shared stack (test_leak pins generation to the fp32 build): they run after
# the package's other modules, so nothing needs restarting back (a restart costs about a minute).
RUN_LAST = ("test_leak.py",)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    last = [i for i in items if i.path.parent == here and i.path.name in RUN_LAST]
    if not last:
        return
    rest = [i for i in items if i not in last]
    at = max((n for n, i in enumerate(rest) if i.path.parent == here), default=len(rest) - 1) + 1
    items[:] = rest[:at] + last + rest[at:]


def stack_used_after(request: pytest.FixtureRequest) -> bool:
    """Whether a test after the requesting module's tests uses the shared stack."""
    items = request.session.items
    end = max(n for n, item in enumerate(items) if item.module is request.module)
    return any("stack" in getattr(item, "fixturenames", ()) for item in items[end + 1:])
