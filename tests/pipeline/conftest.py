"""One running stack for every module of tests/pipeline (starting it costs a few minutes on 2 cores)."""

from __future__ import annotations

import os
from collections.abc import Iterator

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
