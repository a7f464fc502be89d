"""Moderation test fixtures: the real exported encoder (built once into the cache if missing)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from services.moderation import build, paths
from services.moderation.classifier import Heads
from services.moderation.domain import Moderator
from services.moderation.embedder import Embedder
from services.moderation.policy import load


@pytest.fixture(scope="session")
def model_built() -> None:
    """`python -m services.moderation.build` (a no-op when the cache already has it)."""
    build.build()


@pytest.fixture(scope="session")
def moderator(model_built: None) -> Iterator[Moderator]:
    yield Moderator(Embedder(threads=1), Heads.load(paths.CLASSIFIER_FILE), load(paths.POLICY_FILE))
