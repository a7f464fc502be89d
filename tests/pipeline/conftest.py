"""One running stack for every module of tests/pipeline (starting it costs a few minutes on 2 cores)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from devtools.stack import Stack


@pytest.fixture(scope="package")  # stopped after tests/pipeline, before other suites start Ray
def stack(kafka_bootstrap: str) -> Iterator[Stack]:
    s = Stack(kafka_bootstrap).start()
    try:
        yield s
    finally:
        s.stop()
